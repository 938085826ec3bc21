import Foundation
import Testing
import TestSupport

/// File names are bytes: a name that is not UTF-8 reaches open(2), create and every message
/// unchanged, exactly as qemu-img handles it.
@Suite struct ByteNameTests {
    /// create, info (human and JSON) and a missing file's message print the name's own bytes
    /// (JSON with QEMU's U+FFFD), the same bytes as qemu-img.
    @Test(arguments: [
        "$T create -f qcow2 $'bad\\xff.qcow2' 1M",
        "$T create -f raw $'r\\xe9\\xff.img' 64k && $T info $'r\\xe9\\xff.img'",
        // The image made by qemu-img in both runs: only info differs (disk usage is create's).
        "qemu-img create -q -f qcow2 $'bad\\xff.qcow2' 1M && $T info $'bad\\xff.qcow2'",
        "qemu-img create -q -f qcow2 $'bad\\xff.qcow2' 1M && $T info --output=json $'bad\\xff.qcow2'",
        // A cut-short sequence, an overlong form, a surrogate and a noncharacter: QEMU's JSON
        // writer puts one U+FFFD for each the way its own decoder reads them.
        "$T create -q -f raw $'a\\xe2\\x82b\\xc0\\xafc\\xed\\xa0\\x80d\\xef\\xbf\\xbee' 4k && $T info --output=json $'a\\xe2\\x82b\\xc0\\xafc\\xed\\xa0\\x80d\\xef\\xbf\\xbee'",
        "$T info $'nope\\xff'",
        "$T check $'nope\\xff'",
        "$T create -q -f qcow2 $'b\\xff.qcow2' 1M && $T check --output=json $'b\\xff.qcow2'",
        // map's File column, built as bytes.
        "qemu-img create -q -f qcow2 $'m\\xff.qcow2' 1M && qemu-io -c 'write -P 1 0 4k' -c 'write -P 2 512k 4k' $'m\\xff.qcow2' >/dev/null && $T map $'m\\xff.qcow2'",
    ])
    func printsTheBytes(script: String) throws {
        let r = try shellBoth(script)
        #expect(r.ours.status == r.theirs.status)
        #expect(r.ours.stdout == r.theirs.stdout)
        #expect(r.ours.stderr == qemuToSimg(r.theirs.stderr))
    }

    /// `create` and `convert` write exactly the byte name asked for (not a U+FFFD spelling).
    @Test func createsAndConvertsToTheByteName() throws {
        let dir = try TempDir()
        let r = try shell("""
            $T create -q -f qcow2 $'in\\xff.qcow2' 1M && qemu-io -c 'write -P 0x5a 0 64k' $'in\\xff.qcow2' >/dev/null \
            && $T convert -O raw $'in\\xff.qcow2' $'out\\xff.raw'
            """, tool: simgBinary, in: dir.path)
        #expect(r.status == 0, "\(r.errorText)")
        #expect(try byteNameExists("$'in\\xff.qcow2'", in: dir.path))
        #expect(try byteNameExists("$'out\\xff.raw'", in: dir.path))
        #expect(!FileManager.default.fileExists(atPath: dir.file("out\u{FFFD}.raw")))
        let same = try shell("qemu-img convert -O raw $'in\\xff.qcow2' ref.raw && cmp $'out\\xff.raw' ref.raw",
                             tool: simgBinary, in: dir.path)
        #expect(same.status == 0, "\(same.text)")
    }

    /// A backing file name that is not UTF-8 is stored as its bytes (qemu-img reads the same
    /// name and opens the chain) and simg opens it too, from its own header or QEMU's.
    @Test func backingNamesKeepTheirBytes() throws {
        let dir = try TempDir()
        let r = try shell("""
            qemu-img create -q -f qcow2 $'base\\xff.qcow2' 1M && qemu-io -c 'write -P 0x33 0 4k' $'base\\xff.qcow2' >/dev/null \
            && $T create -q -f qcow2 -b $'base\\xff.qcow2' -F qcow2 ours.qcow2 \
            && qemu-img create -q -f qcow2 -b $'base\\xff.qcow2' -F qcow2 theirs.qcow2 \
            && cmp <(head -c 512 ours.qcow2 | od -c) <(head -c 512 theirs.qcow2 | od -c) \
            && qemu-img info --backing-chain ours.qcow2 >/dev/null \
            && $T info --backing-chain theirs.qcow2 | grep -a -c '^image: base' \
            && $T convert -O raw theirs.qcow2 a.raw && qemu-img convert -O raw ours.qcow2 b.raw && cmp a.raw b.raw \
            && qemu-img compare a.raw $'base\\xff.qcow2' >/dev/null
            """, tool: simgBinary, in: dir.path)
        #expect(r.status == 0, "\(r.errorText)")
        #expect(r.text == "1\n")
    }

    /// rebase onto a byte-named file writes those bytes into the header.
    @Test func rebaseStoresTheBytes() throws {
        let dir = try TempDir()
        let r = try shell("""
            qemu-img create -q -f qcow2 $'new\\xfe.qcow2' 1M && qemu-img create -q -f qcow2 top.qcow2 1M \
            && $T rebase -b $'new\\xfe.qcow2' -F qcow2 top.qcow2 && qemu-img info top.qcow2 | grep -a '^backing file:'
            """, tool: simgBinary, in: dir.path)
        #expect(r.status == 0, "\(r.errorText)")
        #expect(r.stdout == Data("backing file: new".utf8) + Data([0xFE]) + Data(".qcow2\n".utf8))
    }

    /// A create that fails after making its file removes exactly that byte-named file (and
    /// leaves the U+FFFD spelling of the name, a file of its own, alone).
    @Test func failedCreateRemovesTheByteNamedFile() throws {
        let dir = try TempDir()
        let r = try shell("""
            touch $'b\\xef\\xbf\\xbd.qcow2' && prlimit --fsize=100000 $T create -f qcow2 -o preallocation=full $'b\\xff.qcow2' 10M
            """, tool: simgBinary, in: dir.path)
        #expect(r.status == 1)
        #expect(r.errorText.contains("File too large"))
        #expect(try !byteNameExists("$'b\\xff.qcow2'", in: dir.path))
        #expect(FileManager.default.fileExists(atPath: dir.file("b\u{FFFD}.qcow2")))
    }
}
