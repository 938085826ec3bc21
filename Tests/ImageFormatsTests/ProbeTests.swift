import DiskIO
import Foundation
import ImageFormats
import Testing
import TestSupport

@Suite("Format probing")
struct ProbeTests {
    func probe(_ path: String, direct: Bool = false) throws -> ImageFormat {
        let file = try DiskFile.open(path, access: .readOnly, cache: direct ? .none : .writeback)
        return try ImageProbe.probe(path: path, file: file)
    }

    /// Formats qemu-img can create that simg refuses by name.
    @Test(arguments: [("vmdk", [String]()), ("vmdk", ["-o", "subformat=monolithicFlat"]), ("vdi", []),
                      ("vhdx", []), ("vpc", []), ("vpc", ["-o", "subformat=fixed"]), ("qed", []),
                      ("parallels", []), ("qcow", [])])
    func refusesOtherFormatsByName(format: String, options: [String]) throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = scratch.file("x.\(format)")
        try qemuImgOutput(["create", "-q", "-f", format] + options + [path, "1M"])
        let error = #expect(throws: UnsupportedFormatError.self) { try probe(path) }
        #expect(error?.format == format)
        #expect(error?.description == "'\(path)' is a \(format) image; that format is not supported yet")
    }

    @Test func qcow2IsRecognisedWhateverTheVersion() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        for compat in ["0.10", "1.1"] {
            let path = scratch.file("v\(compat).qcow2")
            try qemuImgOutput(["create", "-q", "-f", "qcow2", "-o", "compat=\(compat)", path, "1M"])
            #expect(try probe(path) == .qcow2)
            #expect(try probe(path, direct: true) == .qcow2)
        }
        let future = scratch.file("v9.qcow2")
        try DiskFile.create(future).write([0x51, 0x46, 0x49, 0xFB, 0, 0, 0, 9] + [UInt8](repeating: 0, count: 504), at: 0)
        #expect(try probe(future) == .qcow2)
    }

    @Test func everythingElseIsRaw() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        let empty = scratch.file("empty")
        _ = try DiskFile.create(empty)
        #expect(try probe(empty) == .raw)
        let raw = scratch.file("disk.img")
        try RawCreate.create(path: raw, size: 1 << 20)
        #expect(try probe(raw) == .raw)
        #expect(try probe(raw, direct: true) == .raw)
        let tiny = scratch.file("tiny")
        try DiskFile.create(tiny).write(Array("QFI".utf8), at: 0)  // a truncated magic is not qcow2
        #expect(try probe(tiny) == .raw)
        // A LUKS2 header is not probed as luks (QEMU 7.2 only knows LUKS1).
        let luks2 = scratch.file("luks2")
        try DiskFile.create(luks2).write([0x4C, 0x55, 0x4B, 0x53, 0xBA, 0xBE, 0, 2] + [UInt8](repeating: 0, count: 4088), at: 0)
        #expect(try probe(luks2) == .raw)
    }

    @Test func handMadeHeadersOfFormatsQemuCannotCreate() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        func make(_ name: String, _ bytes: [UInt8]) throws -> String {
            let path = scratch.file(name)
            var padded = bytes
            padded += [UInt8](repeating: 0, count: 4096 - bytes.count)
            try DiskFile.create(path).write(padded, at: 0)
            return path
        }
        let cloop = try make("c.img", Array("#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n".utf8))
        #expect((#expect(throws: UnsupportedFormatError.self) { try probe(cloop) })?.format == "cloop")
        var bochs = [UInt8](repeating: 0, count: 68)
        for (i, c) in "Bochs Virtual HD Image".utf8.enumerated() { bochs[i] = c }
        for (i, c) in "Redolog".utf8.enumerated() { bochs[32 + i] = c }
        for (i, c) in "Growing".utf8.enumerated() { bochs[48 + i] = c }
        bochs[66] = 2  // version 0x00020000, little-endian
        let bochsPath = try make("b.img", bochs)
        #expect((#expect(throws: UnsupportedFormatError.self) { try probe(bochsPath) })?.format == "bochs")
        let descriptor = try make("d.img", Array("# Disk DescriptorFile\nversion=1\nCID=fffffffe\n".utf8))
        #expect((#expect(throws: UnsupportedFormatError.self) { try probe(descriptor) })?.format == "vmdk")
        // LUKS1 by hand: qemu-img's luks creation times its key derivation and fails
        // ("Unable to get accurate CPU usage") on a busy machine.
        let luks = try make("l.img", [0x4C, 0x55, 0x4B, 0x53, 0xBA, 0xBE, 0, 1] + Array("aes".utf8))
        #expect((#expect(throws: UnsupportedFormatError.self) { try probe(luks) })?.description
                == "'\(luks)' is a luks image; that format is not supported yet")
        let dmg = try make("apple.dmg", [])
        #expect((#expect(throws: UnsupportedFormatError.self) { try probe(dmg) })?.format == "dmg")
    }

    /// Our verdicts agree with qemu-img's own probing.
    @Test func agreesWithQemuImgInfo() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        for format in ["vdi", "qed", "vhdx"] {
            let path = scratch.file("agree.\(format)")
            try qemuImgOutput(["create", "-q", "-f", format, path, "1M"])
            let info = try qemuImgOutput(["info", "--output=json", path])
            #expect(info.contains("\"format\": \"\(format)\""))
            #expect((#expect(throws: UnsupportedFormatError.self) { try probe(path) })?.format == format)
        }
    }
}
