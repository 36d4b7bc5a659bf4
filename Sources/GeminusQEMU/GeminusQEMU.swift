// The QEMU module: see the issue of the real libvirt/QEMU path.
