/// Where a journaled replica disk's bytes go: the guest-visible disk, addressed by virtual
/// offsets. `FileBlockBackend` writes a raw file or block device in place; a qcow2 image is
/// written through QEMU's own driver (`GeminusQEMU.NBDBlockBackend` over qemu-storage-daemon),
/// because its bytes are not at their virtual offsets in the file.
///
/// `JournaledReplicaDisk` checks bounds and keeps the crash-safety contract; a backend only
/// writes, zeroes and syncs.
public protocol BlockBackend: AnyObject {
    /// The disk's virtual size.
    var sizeBytes: UInt64 { get }
    /// For error messages: the image's path and how it is written.
    var name: String { get }
    /// Writes the whole buffer at `offset`, or throws.
    func write(offset: UInt64, _ data: [UInt8]) throws(GeminusError)
    /// Makes `length` bytes from `offset` read as zeros.
    func zero(offset: UInt64, length: UInt64) throws(GeminusError)
    /// Makes the whole disk read as zeros.
    func zeroAll() throws(GeminusError)
    /// Makes everything written so far durable (on the image's own storage).
    func sync() throws(GeminusError)
}
