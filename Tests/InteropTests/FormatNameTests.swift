import Foundation
import Testing
import TestSupport

/// Format names on the command line: a name QEMU does not know gets qemu-img's message in
/// every command; a QEMU format simg does not have yet says so, the same way everywhere.
@Suite struct FormatNameTests {
    static let prepare = "qemu-img create -q -f qcow2 a.qcow2 1M"
    static let commands = [
        "$T convert -f NAME a.qcow2 o.raw",
        "$T convert -O NAME a.qcow2 o.img",
        "$T info -f NAME a.qcow2",
        "$T check -f NAME a.qcow2",
        "$T rebase -f NAME -u -b '' a.qcow2",
        "$T create -f NAME x.img 1M",
        "$T create -f qcow2 -b a.qcow2 -F NAME y.qcow2",
        "$T info 'json:{\"driver\":\"NAME\",\"file.filename\":\"a.qcow2\"}'",
    ]

    @Test(arguments: commands)
    func unknownNamesAsQemu(script: String) throws {
        let filled = script.replacingOccurrences(of: "NAME", with: "foo")
        let r = try shellBoth(filled, prepare: Self.prepare)
        #expect(r.theirs.status == 1)
        #expect(r.ours.status == r.theirs.status)
        #expect(r.ours.stderr == qemuToSimg(r.theirs.stderr), "\(filled): \(r.ours.errorText)")
    }

    /// -u stores a QEMU format simg lacks as the backing format, in create and rebase alike.
    @Test(arguments: [
        "$T rebase -u -F vmdk -b v.vmdk a.qcow2 && qemu-img info a.qcow2 | grep backing",
        "$T create -f qcow2 -u -b v.vmdk -F vmdk o.qcow2 1M && qemu-img info o.qcow2 | grep backing",
    ])
    func unsafeStoresQemuFormats(script: String) throws {
        let r = try shellBoth(script, prepare: Self.prepare)
        #expect(r.theirs.status == 0)
        #expect(r.ours.status == 0, "\(r.ours.errorText)")
        #expect(r.ours.text == r.theirs.text)
    }

    /// The expected message after "simg: " for vmdk; nothing is created.
    @Test(arguments: zip(commands, [
        "Could not open 'a.qcow2': the vmdk format is not supported yet",
        "the vmdk format is not supported yet",
        "Could not open 'a.qcow2': the vmdk format is not supported yet",
        "Could not open 'a.qcow2': the vmdk format is not supported yet",
        "Could not open 'a.qcow2': the vmdk format is not supported yet",
        "x.img: the vmdk format is not supported yet",
        "y.qcow2: Could not open 'a.qcow2': the vmdk format is not supported yet\nCould not open backing image.",
        "Could not open 'json:{\"driver\":\"vmdk\",\"file.filename\":\"a.qcow2\"}': the vmdk format is not supported yet",
    ]))
    func unsupportedFormatsSaySo(script: String, message: String) throws {
        let dir = try TempDir()
        _ = try shell(Self.prepare, tool: "qemu-img", in: dir.path)
        let r = try shell(script.replacingOccurrences(of: "NAME", with: "vmdk"), tool: simgBinary, in: dir.path)
        #expect(r.status == 1)
        #expect(r.errorText == "simg: \(message)\n")
        let left = try FileManager.default.contentsOfDirectory(atPath: dir.path)
        #expect(left == ["a.qcow2"])
    }
}
