#!/usr/bin/env python3
"""Prints the libvirt domain XML of the guest-linux test guest.

    domain.py NAME --kernel VMLINUZ --initrd INITRAMFS --serial LOG
              [--ram-mib 256] [--vcpus 1] [--disk IMG [--disk-readonly]]
              [--bridge BR [--mac 52:54:00:47:4c:02] [--ip 10.77.0.2/24]]
              [--append 'geminus.log_s=5'] [--ready [--preload LIB]]

The domain is what a user would write: <domain type='qemu'> (TCG: KVM cannot run it on these
machines), machine pc, kernel + initrd boot with the guest's command line, a virtio disk (raw,
cache='none', so a guest flush is an fdatasync of the image), a virtio NIC on a bridge, a
serial console logged to a file. It is made CA-ready by `geminus enroll NAME --peer P
--prepare --yes` (shared file memory backing, <memballoon model='none'/>, the agent's private
QMP socket, and LD_PRELOAD of the write-tracking library when it is built), exactly as for
any user's domain. --ready adds those parts here instead (what CAEnrollmentCheck.prepare
writes), for use without the geminus binary.

Enrolment today refuses a writable disk (CAEnrollmentRules: Geminus does not replicate a
libvirt domain's disks yet): --disk-readonly marks it <readonly/>; the guest then runs with
disk=ro (the transaction log in RAM only).
"""
import argparse
import os
import sys
from xml.sax.saxutils import quoteattr, escape

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
PRIVATE_QMP_DIR = "/run/geminus/qmp"  # PrivateQMP.directory


def domain_xml(name, kernel, initrd, serial, ram_mib=256, vcpus=1, disk=None, disk_readonly=False,
               bridge=None, mac="52:54:00:47:4c:02", ip="10.77.0.2/24", append="", ready=False, preload=None,
               disk_format="raw"):
    cmdline = "console=ttyS0 ipv6.disable=1 geminus.hostname=" + name
    if bridge and ip:
        cmdline += " geminus.ip=" + ip
    if append:
        cmdline += " " + append
    q = quoteattr
    lines = [f"<domain type='qemu'{' xmlns:qemu=' + q(QEMU_NS) if ready else ''}>",
             f"  <name>{escape(name)}</name>",
             f"  <memory unit='MiB'>{int(ram_mib)}</memory>",
             f"  <vcpu>{int(vcpus)}</vcpu>"]
    if ready:
        lines.append("  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>")
    lines += ["  <os>",
              "    <type arch='x86_64' machine='pc'>hvm</type>",
              f"    <kernel>{escape(kernel)}</kernel>",
              f"    <initrd>{escape(initrd)}</initrd>",
              f"    <cmdline>{escape(cmdline)}</cmdline>",
              "  </os>",
              "  <features><acpi/></features>",
              "  <clock offset='utc'/>",
              "  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>",
              "  <devices>"]
    if disk:
        lines += ["    <disk type='file' device='disk'>",
                  f"      <driver name='qemu' type={q(disk_format)} cache='none'/>",
                  f"      <source file={q(disk)}/>",
                  "      <target dev='vda' bus='virtio'/>"]
        if disk_readonly:
            lines.append("      <readonly/>")
        lines.append("    </disk>")
    if bridge:
        lines += ["    <interface type='bridge'>",
                  f"      <source bridge={q(bridge)}/>",
                  f"      <mac address={q(mac)}/>",
                  "      <model type='virtio'/>",
                  "    </interface>"]
    lines += ["    <serial type='file'>",
              f"      <source path={q(serial)}/>",
              "      <target port='0'/>",
              "    </serial>"]
    if ready:
        lines.append("    <memballoon model='none'/>")
    lines.append("  </devices>")
    if ready:
        lines.append("  <qemu:commandline>")
        lines.append("    <qemu:arg value='-qmp'/>")
        lines.append(f"    <qemu:arg value={q('unix:' + PRIVATE_QMP_DIR + '/' + name + '.sock,server=on,wait=off')}/>")
        if preload:
            lines.append(f"    <qemu:env name='LD_PRELOAD' value={q(preload)}/>")
        lines.append("  </qemu:commandline>")
    lines.append("</domain>")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("--kernel", required=True)
    p.add_argument("--initrd", required=True)
    p.add_argument("--serial", required=True, help="serial console log file")
    p.add_argument("--ram-mib", type=int, default=256)
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--disk", help="disk image (the guest formats a blank one as its transaction log)")
    p.add_argument("--disk-readonly", action="store_true")
    p.add_argument("--disk-format", default="raw", choices=("raw", "qcow2"), help="the image's format (<driver type>)")
    p.add_argument("--bridge", help="host bridge for the virtio NIC (none: no NIC)")
    p.add_argument("--mac", default="52:54:00:47:4c:02")
    p.add_argument("--ip", default="10.77.0.2/24", help="guest address (geminus.ip), with --bridge")
    p.add_argument("--append", default="", help="more guest command line words (geminus.log_s=5, ...)")
    p.add_argument("--ready", action="store_true", help="add what `geminus enroll --prepare` adds")
    p.add_argument("--preload", help="with --ready: the write-tracking library for LD_PRELOAD")
    a = p.parse_args()
    for path in (a.kernel, a.initrd) + ((a.disk,) if a.disk else ()):
        if not os.path.isabs(path):
            sys.exit(f"domain.py: {path}: libvirt needs absolute paths")
    sys.stdout.write(domain_xml(a.name, a.kernel, a.initrd, a.serial, a.ram_mib, a.vcpus, a.disk, a.disk_readonly,
                                a.bridge, a.mac, a.ip, a.append, a.ready, a.preload, a.disk_format))


if __name__ == "__main__":
    main()
