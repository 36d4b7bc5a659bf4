#if canImport(Glibc)
import Glibc
#endif

/// Files the agent creates for a guest (RAM, device state, disks): created exclusively and
/// never through a symbolic link, so a file or link another user planted at the path is
/// refused instead of used (review H3). A file that is meant to exist already (a replica the
/// standby reuses) is opened without following links and must be this user's alone.
public enum PrivateFile {
    /// Creates `path`, which must not exist, mode 0600 (O_CREAT|O_EXCL|O_NOFOLLOW): a
    /// read-write, close-on-exec descriptor. `what` names the file in errors ("the RAM file").
    public static func createNew(_ path: String, what: String) throws(GeminusError) -> Int32 {
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            let e = errno
            if e == EEXIST {
                throw GeminusError(.io, "cannot create \(what) \(path): something is already there (a file or a symbolic link this agent did not create); refusing to use it",
                                   fix: "if it is a leftover of an earlier run, remove it; otherwise find out who put it there")
            }
            throw GeminusError(.io, "cannot create \(what) \(path): \(String(cString: strerror(e)))",
                               fix: "check that its directory exists and this agent may write there")
        }
        return fd
    }

    /// Opens `path` read-write if it exists (without following a link, and only a regular file
    /// of this user that no other user may open), else creates it as `createNew` does.
    public static func openOrCreate(_ path: String, what: String) throws(GeminusError) -> (fd: Int32, created: Bool) {
        let fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC)
        if fd < 0 {
            let e = errno
            guard e == ENOENT else { throw refusal(path, what: what, errno: e) }
            return (try createNew(path, what: what), true)
        }
        do throws(GeminusError) {
            try checkOwnedAlone(fd, path: path, what: what)
        } catch {
            close(fd)
            throw error
        }
        return (fd, false)
    }

    /// Opens an existing `path` read-write without following a link; it must be a regular
    /// file of this user (or root) that no other user may open.
    public static func openExisting(_ path: String, what: String) throws(GeminusError) -> Int32 {
        let fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { throw refusal(path, what: what, errno: errno) }
        do throws(GeminusError) {
            try checkOwnedAlone(fd, path: path, what: what)
        } catch {
            close(fd)
            throw error
        }
        return fd
    }

    /// The checks of an opened file that must be ours: regular, owned by this user or root,
    /// no group or other access.
    public static func checkOwnedAlone(_ fd: Int32, path: String, what: String) throws(GeminusError) {
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            throw GeminusError(.io, "cannot stat \(what) \(path): \(String(cString: strerror(errno)))")
        }
        guard st.st_mode & S_IFMT == S_IFREG else {
            throw GeminusError(.io, "\(what) \(path) is not a regular file; refusing to use it", fix: "remove it and start again")
        }
        guard st.st_uid == geteuid() || st.st_uid == 0 else {
            throw GeminusError(.io, "\(what) \(path) belongs to uid \(st.st_uid), not to this agent (uid \(geteuid())); refusing to use it",
                               fix: "remove it if it is a leftover, and find out who put it there")
        }
        guard st.st_mode & 0o077 == 0 else {
            throw GeminusError(.io, "\(what) \(path) may be opened by other users (mode 0\(String(st.st_mode & 0o777, radix: 8))); refusing to use it",
                               fix: "remove it (the agent creates it mode 0600), or chmod 600 \(path)")
        }
    }

    private static func refusal(_ path: String, what: String, errno e: Int32) -> GeminusError {
        if e == ELOOP {
            return GeminusError(.io, "\(what) \(path) is a symbolic link; refusing to follow it",
                                fix: "remove the link; the agent creates its files itself")
        }
        return GeminusError(.io, "cannot open \(what) \(path): \(String(cString: strerror(e)))",
                            fix: "check that its directory exists and this agent may write there")
    }
}
