import Foundation
import Testing
import TestSupport

/// QEMU's name syntax: `file:` prefixes, protocols it does not know, `json:{...}` names, and
/// devices whose names have colons; each compared with qemu-img 7.2's output and messages.
@Suite struct NameSyntaxTests {
    static let prepare = """
        qemu-img create -q -f qcow2 x.qcow2 1M && qemu-io -c 'write -P 0x11 0 64k' x.qcow2 >/dev/null \
        && head -c 1048576 /dev/urandom > r.img && qemu-img create -q -f raw t.raw 2M \
        && mkdir sub && qemu-img create -q -f qcow2 sub/y.qcow2 1M
        """

    /// The same exit status, stdout and stderr as qemu-img (its program name replaced).
    @Test(arguments: [
        // file: is the file.
        "$T info file:x.qcow2",
        "$T info --output=json file:x.qcow2",
        "$T info file:nope",
        "$T info file:sub",
        // Empty names: the protocol driver's refusal, before any open(2).
        "$T info ''",
        "$T info file:",
        "$T info host_device:",
        "$T check ''",
        "$T map ''",
        "$T compare '' x.qcow2",
        "$T convert -O raw '' out.raw",
        "$T dd if= of=out.raw",
        "$T info 'json:{\"file\":{\"driver\":\"file\",\"filename\":\"\"}}'",
        "$T info host_device:r.img",
        "$T check file:x.qcow2",
        "$T check --output=json file:x.qcow2",
        "$T create -f qcow2 file:new.qcow2 1M && ls new.qcow2",
        "$T create -f qcow2 -o cluster_size=3 file:new.qcow2 1M",
        "$T create -f qcow2 file:/nonexistent/dir/new.qcow2 1M",
        "$T create -f raw file:/nonexistent/dir/new.img 1M",
        "$T convert -O qcow2 x.qcow2 file:out.qcow2 && qemu-img compare x.qcow2 out.qcow2",
        "$T convert -O raw file:x.qcow2 out.raw && qemu-img compare x.qcow2 out.raw",
        "$T convert -O raw file:nope out.raw",
        "$T convert -O raw x.qcow2 file:/nonexistent/dir/out",
        "qemu-img create -q -f qcow2 -u -b file:x.qcow2 -F qcow2 o.qcow2 1M && $T info --backing-chain o.qcow2",
        "$T create -f qcow2 -b file:nope -F qcow2 o.qcow2",
        // Protocols qemu-img does not know.
        "$T info c:x.qcow2",
        "$T check c:x.qcow2",
        "$T create -f qcow2 c:x.qcow2 1M",
        "$T create -f qcow2 -b c:x.qcow2 -F qcow2 o.qcow2",
        "$T convert -O qcow2 c:x.qcow2 out.qcow2",
        "$T convert -O qcow2 x.qcow2 c:out.qcow2",
        "$T rebase -b c:x.qcow2 -F qcow2 sub/y.qcow2",
        "$T info ./c:x.qcow2",
        "$T create -f qcow2 -o data_file=file:d.raw q.qcow2 1M && ls && qemu-img info q.qcow2 | grep 'data file:'",
        "$T create -f qcow2 -o data_file=c:d.raw q.qcow2 1M; ls",
        "qemu-img create -q -f raw ./c:z 1M && $T info file:c:z && $T info --output=json file:c:z",
        "$T create -f qcow2 ./c:y.qcow2 1M && ls c:y.qcow2",
        // json: names.
        "$T info 'json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"x.qcow2\"}}'",
        "$T info --output=json 'json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"x.qcow2\"}}'",
        "$T info 'json:{\"file.filename\":\"x.qcow2\"}'",
        "$T info \"json:{'driver':'raw','file.filename':'r.img','offset':512}\"",
        "$T info 'json:{\"driver\":\"raw\",\"offset\":512,\"size\":4096,\"file\":{\"driver\":\"file\",\"filename\":\"r.img\"}}'",
        "$T info --output=json 'json:{\"driver\":\"raw\",\"size\":\"1k\",\"file\":{\"driver\":\"file\",\"filename\":\"r.img\"}}'",
        "$T info 'json:{\"driver\":\"raw\",\"offset\":1000,\"file\":{\"driver\":\"file\",\"filename\":\"r.img\"}}'",
        "$T check --output=json 'json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"x.qcow2\"}}'",
        "$T info 'json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"x.qcow2\"},\"foo\":1}'",
        "$T info 'json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"x.qcow2\",\"bar\":1}}'",
        "$T info 'json:{\"driver\":\"qcow2\",\"offset\":512,\"file.filename\":\"x.qcow2\"}'",
        "$T info 'json:{\"offset\":512,\"file.filename\":\"x.qcow2\"}'",
        "$T info 'json:{\"driver\":\"raw\",\"size\":1000,\"file.filename\":\"r.img\"}'",
        "$T info 'json:{\"driver\":\"raw\",\"offset\":99999999,\"file.filename\":\"r.img\"}'",
        "$T info 'json:{\"driver\":\"raw\",\"offset\":512,\"size\":99999999,\"file.filename\":\"r.img\"}'",
        "$T info 'json:{\"driver\":\"raw\",\"offset\":-1,\"file.filename\":\"r.img\"}'",
        "$T info 'json:{\"driver\":\"foo\",\"file.filename\":\"r.img\"}'",
        "$T info 'json:{\"driver\":\"qcow2\",\"file\":\"x.qcow2\"}'",
        "$T info 'json:{\"driver\":\"qcow2\",\"filename\":\"x.qcow2\"}'",
        "$T info 'json:{\"filename\":\"x.qcow2\"}'",
        "$T info 'json:{\"driver\":\"raw\",\"driver\":\"qcow2\",\"file.filename\":\"x.qcow2\"}'",
        "$T info 'json:{\"driver\":\"raw\",\"file.filename\":\"x.qcow2\"} x'",
        // file.filename is the file's name as written: no protocol prefix is parsed in it.
        "qemu-img create -q -f raw ./file:p 2M && $T info 'json:{\"file.filename\":\"file:p\"}'",
        "qemu-img create -q -f raw ./c:y 1M && $T info 'json:{\"file.filename\":\"c:y\"}'",
        "$T info 'json:{\"file.filename\":\"nbd:x\"}'",
        "$T info 'json:{\"file.filename\":\"host_device:r.img\"}'",
        "$T info 'json:{\"file.driver\":\"file\",\"file.filename\":\"file:x.qcow2\"}'",
        "qemu-img create -q -f raw ./c:y 1M && $T create -q -f qcow2 -u -b 'json:{\"file.filename\":\"c:y\"}' -F raw o.qcow2 1M && qemu-img info o.qcow2 | grep backing",
        "$T info 'json:[1]'",
        "$T info 'json:{\"driver\":\"raw\",\"file.filename\":\"r.img\",\"file.driver\":\"host_device\"}'",
        "$T info -f qcow2 'json:{\"driver\":\"raw\",\"file.filename\":\"x.qcow2\"}'",
        "$T info 'json:{\"driver\":\"qcow2\",\"file.filename\":\"nope\"}'",
        "$T create -f qcow2 'json:{\"driver\":\"qcow2\",\"file.filename\":\"j.qcow2\"}' 1M",
        "$T convert -O raw x.qcow2 'json:{\"driver\":\"raw\",\"file.filename\":\"t.raw\"}'",
        "$T convert -n -O qcow2 x.qcow2 'json:{\"driver\":\"raw\",\"offset\":4096,\"file.filename\":\"t.raw\"}'",
        "$T convert -O raw 'json:{\"driver\":\"raw\",\"offset\":512,\"size\":4096,\"file.filename\":\"r.img\"}' w.raw && cmp w.raw <(tail -c +513 r.img | head -c 4096)",
        "$T convert -T none -O raw 'json:{\"driver\":\"raw\",\"offset\":100,\"size\":65536,\"file.filename\":\"r.img\"}' w.raw && cmp w.raw <(tail -c +101 r.img | head -c 65536)",
        "$T convert -n -O raw x.qcow2 'json:{\"driver\":\"raw\",\"offset\":1048576,\"file.filename\":\"t.raw\"}' && cmp <(tail -c +1048577 t.raw) <(qemu-img convert -O raw x.qcow2 v.raw && cat v.raw) && cmp -n 1048576 t.raw /dev/zero",
        // A json: backing name, as QEMU writes after some block jobs.
        "qemu-img create -q -f qcow2 -u -b 'json:{\"driver\":\"raw\",\"offset\":512,\"size\":1048064,\"file\":{\"driver\":\"file\",\"filename\":\"r.img\"}}' -F raw o.qcow2 1M && $T info --backing-chain o.qcow2",
        "qemu-img create -q -f qcow2 -u -b 'json:{\"driver\":\"raw\",\"offset\":512,\"size\":1048064,\"file\":{\"driver\":\"file\",\"filename\":\"r.img\"}}' -F raw o.qcow2 1M && $T info --output=json --backing-chain o.qcow2",
        "$T create -q -f qcow2 -u -b 'json:{\"driver\":\"raw\",\"offset\":512,\"file.filename\":\"r.img\"}' -F raw o.qcow2 1M && $T convert -O raw o.qcow2 c.raw && cmp c.raw <(tail -c +513 r.img; head -c 512 /dev/zero)",
    ])
    func matchesQemu(script: String) throws {
        let r = try shellBoth(script, prepare: NameSyntaxTests.prepare)
        #expect(r.ours.status == r.theirs.status, "\(r.ours.errorText) / \(r.theirs.errorText)")
        #expect(r.ours.text == r.theirs.text)
        #expect(r.ours.errorText == String(decoding: qemuToSimg(r.theirs.stderr), as: UTF8.self))
    }

    /// A protocol named in front of a target holds to its kind of file, as in qemu-img:
    /// `file:` on a device (a null device node of the test's own) fails as the file driver's
    /// truncate does, `host_device:` on anything but a device cannot create. The node stays a
    /// node and nothing is created.
    @Test(arguments: [
        "$T create -f raw file:mynull 1M", "$T create -f qcow2 file:mynull 1M",
        "$T convert -O raw r.img file:mynull", "$T convert -O qcow2 r.img file:mynull",
        "$T convert -n -O raw r.img file:mynull",
        "$T create -f raw host_device:hd 1M", "$T create -f qcow2 host_device:hd 1M",
        "$T convert -O raw r.img host_device:hd", "$T convert -O qcow2 r.img host_device:hd",
        "$T create -f raw host_device:t.raw 1M", "$T convert -n -O raw r.img host_device:t.raw",
    ])
    func protocolsOfTargets(script: String) throws {
        let r = try shellBoth(script + "; echo $?; ls; stat -c %F mynull", prepare: NameSyntaxTests.prepare + " && mknod mynull c 1 3")
        #expect(r.ours.text == r.theirs.text)
        #expect(r.ours.errorText == String(decoding: qemuToSimg(r.theirs.stderr), as: UTF8.self))
        #expect(r.ours.text.hasSuffix("character special file\n"))
    }

    /// A device node is opened by its name even with a colon in it (QEMU probes host_device
    /// before protocols): here a node of the zero device in the test's own folder.
    @Test func deviceNamesWithColons() throws {
        let r = try shellBoth("$T info 'z:dev' && $T info --output=json 'z:dev'", prepare: "mknod 'z:dev' c 1 5")
        #expect(r.theirs.status == 0, "\(r.theirs.errorText)")
        #expect(r.ours.status == 0, "\(r.ours.errorText)")
        #expect(r.ours.stdout == r.theirs.stdout)
    }

    /// qemu-img create -u and rebase -u store any name; simg refuses one with a protocol QEMU
    /// does not know (or a json: name it cannot read), so it never writes an image whose
    /// backing file no one can open. Nothing is created, the rebased image is unchanged.
    @Test func neverStoresABackingNameQemuCannotOpen() throws {
        let dir = try TempDir()
        try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "top.qcow2", "1M")
        let before = try Data(contentsOf: URL(fileURLWithPath: dir.file("top.qcow2")))
        let create = try simg(in: dir.path, "create", "-f", "qcow2", "-u", "-b", "c:x.qcow2", "-F", "qcow2", "o.qcow2", "1M")
        #expect(create.status == 1)
        #expect(create.stderr == "simg: o.qcow2: Unknown protocol 'c' in backing file name 'c:x.qcow2': QEMU could not open it (a file of that name is './c:x.qcow2' or 'file:c:x.qcow2')\n")
        #expect(!FileManager.default.fileExists(atPath: dir.file("o.qcow2")))
        for name in ["c:x.qcow2", "json:{\"driver\":\"qcow2\",\"file.filename\":\"x\",\"zz\":1}", "json:{"] {
            let rebase = try simg(in: dir.path, "rebase", "-u", "-b", name, "-F", "qcow2", "top.qcow2")
            #expect(rebase.status == 1)
            #expect(rebase.stderr.hasPrefix("simg: Could not change the backing file to '\(name)': "))
            #expect(rebase.stderr.contains("in backing file name '\(name)'"))
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: dir.file("top.qcow2"))) == before)
        // Names QEMU opens are stored, as by qemu-img: a file: name, a protocol QEMU has.
        for name in ["file:x.qcow2", "nbd:localhost:10809", "./c:x.qcow2"] {
            let ok = try simg(in: dir.path, "rebase", "-u", "-b", name, "-F", "qcow2", "top.qcow2")
            #expect(ok.status == 0, "\(ok.stderr)")
            #expect(try qemuImg(in: dir.path, "info", "top.qcow2").stdout.contains("backing file: \(name)\n"))
        }
    }
}
