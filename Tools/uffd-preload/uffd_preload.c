// geminus-uffd-preload: loaded into QEMU with LD_PRELOAD so that QEMU's process owns a
// userfaultfd the Geminus agent can take (pidfd_getfd) and drive from outside.
//
// Why a preload at all: userfaultfd ioctls act on the memory of the process that *created* the
// descriptor, not of the process calling them. Stock QEMU never creates one outside postcopy,
// so something must create it inside QEMU; a constructor is the smallest thing that can.
//
// It does nothing else: no thread, no socket, no ioctl. The agent finds the descriptor among
// /proc/PID/fd (it shows as "anon_inode:[userfaultfd]") and configures it (UFFDIO_API with
// WP_ASYNC, register, write-protect). Until then the descriptor is inert, so a QEMU started
// with this library but never protected behaves exactly like one without it.
//
// Build: Tools/uffd-preload/build.sh (gcc; prints the .so path). Not a SwiftPM product on
// purpose: SwiftPM links every dynamic library with swiftc, which adds libswiftCore and the
// Swift runtime's image registration, and QEMU must not load the Swift runtime.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_userfaultfd
#define SYS_userfaultfd 323 /* x86_64 */
#endif
// Lets an unprivileged QEMU (libvirt-qemu user) create one even with
// vm.unprivileged_userfaultfd=0: the descriptor then only handles user-mode faults, which is
// all asynchronous write-protect needs (kernel 5.11+).
#define GEMINUS_UFFD_USER_MODE_ONLY 1

// The descriptor, for a debugger or core dump; the agent does not read it (it scans /proc).
__attribute__((visibility("default"))) int geminus_uffd_preload_fd = -1;

__attribute__((constructor)) static void geminus_uffd_preload_init(void) {
    // O_CLOEXEC: a helper QEMU execs must not inherit it (its writes would not be QEMU's).
    // O_NONBLOCK: nobody ever reads fault messages from it (WP_ASYNC resolves faults in the
    // kernel); non-blocking keeps an accidental read from hanging.
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | GEMINUS_UFFD_USER_MODE_ONLY);
    if (fd < 0) {
        // One line on QEMU's stderr: the agent's error says to look there. QEMU runs on; the
        // agent falls back to comparing pages.
        int e = errno;
        fprintf(stderr, "geminus-uffd-preload: userfaultfd() failed: %s (errno %d); "
                        "write tracking unavailable for this QEMU (needs Linux 5.11+ and no seccomp "
                        "filter denying userfaultfd)\n", strerror(e), e);
        return;
    }
    geminus_uffd_preload_fd = fd;
}
