import Foundation
import Testing

/// Every command takes the same cache modes as qemu-img 7.2 (`off` is `none`), and refuses
/// the same names with the same words (-t: "Invalid cache option", -T: "Invalid source ...").
@Suite struct CacheModeTests {
    static let prepare = "qemu-img create -q -f qcow2 a.qcow2 1M && qemu-io -c 'write -P 7 0 64k' a.qcow2 >/dev/null"
    static let modes = ["off", "none", "directsync", "writeback", "writethrough", "unsafe", "bogus", "''", "NONE"]

    @Test(arguments: [
        "$T convert -t MODE -O raw a.qcow2 o.raw && qemu-img compare a.qcow2 o.raw",
        "$T convert -t MODE -O qcow2 a.qcow2 o.qcow2 && qemu-img compare a.qcow2 o.qcow2",
        "$T convert -T MODE -O raw a.qcow2 o.raw && qemu-img compare a.qcow2 o.raw",
        "$T check -T MODE a.qcow2",
        "$T rebase -u -b '' -t MODE a.qcow2 && qemu-img info a.qcow2 | grep -c backing",
        "$T rebase -u -b '' -T MODE a.qcow2",
    ])
    func matchesQemu(script: String) throws {
        for mode in Self.modes {
            let filled = script.replacingOccurrences(of: "MODE", with: mode)
            let (theirs, ours, _, _) = try shellBoth(filled, prepare: Self.prepare)
            #expect(ours.status == theirs.status, "\(filled): status \(ours.status), qemu-img \(theirs.status)")
            #expect(ours.stdout == qemuToSimg(theirs.stdout), "\(filled): stdout \(ours.text)")
            #expect(ours.stderr == qemuToSimg(theirs.stderr), "\(filled): stderr \(ours.errorText)")
        }
    }
}
