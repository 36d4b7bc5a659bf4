// libvirt: see the issue of the real libvirt/QEMU path.
