import DiskIO
@testable import ImageFormats
import Testing

@Suite("Image names")
struct ImageNameTests {
    @Test func protocols() throws {
        #expect(ImageName.protocolName(of: "c:x") == "c")
        #expect(ImageName.protocolName(of: "./c:x") == nil)
        #expect(ImageName.protocolName(of: "/a/b:c") == nil)
        #expect(ImageName.protocolName(of: "plain.qcow2") == nil)
        #expect(try ImageName.parse("file:a:b").path == "a:b")
        #expect(try ImageName.parse("file:a:b").driver == .file)
        #expect(try ImageName.parse("host_device:/dev/x").driver == .hostDevice)
        #expect(try ImageName.parse("x.qcow2") == ImageLocation(name: "x.qcow2", path: "x.qcow2"))
        for (name, message) in [("c:x", "Unknown protocol 'c'"), ("nbd:h:1", "simg does not support the 'nbd' protocol"),
                                (String(repeating: "p", count: 200) + ":x", "Unknown protocol '\(String(repeating: "p", count: 127))'")] {
            #expect(throws: ImageError.self) { try ImageName.parse(name) }
            do {
                _ = try ImageName.parse(name)
            } catch let error as ImageError {
                #expect(error.message == message)
                #expect(error.path == name)
            }
        }
    }

    @Test func backingResolution() {
        #expect(ImageName.resolve(backing: "b.qcow2", relativeTo: "dir/top.qcow2") == "dir/b.qcow2")
        #expect(ImageName.resolve(backing: "/abs/b", relativeTo: "dir/top.qcow2") == "/abs/b")
        #expect(ImageName.resolve(backing: "file:b", relativeTo: "dir/top.qcow2") == "file:b")
        #expect(ImageName.resolve(backing: "json:{}", relativeTo: "dir/top.qcow2") == "json:{}")
        #expect(ImageName.resolve(backing: "b", relativeTo: "top") == "b")
        #expect(ImageName.backingNameProblem("file:b") == nil)
        #expect(ImageName.backingNameProblem("nbd:host:10809") == nil)
        #expect(ImageName.backingNameProblem("c:b")?.hasPrefix("Unknown protocol 'c' in backing file name 'c:b'") == true)
        #expect(ImageName.backingNameProblem("json:{\"driver\":\"qcow2\"") != nil)
    }

    @Test func jsonNames() throws {
        let window = try ImageName.parse(#"json:{"driver":"raw","offset":"1k","size":4096,"file":{"driver":"file","filename":"r.img"}}"#)
        #expect(window.path == "r.img")
        #expect(window.driver == .file)
        #expect(window.format == "raw")
        #expect(window.rawOffset == 1024)
        #expect(window.rawSize == 4096)
        #expect(window.rawOptions == ["offset", "size"])
        #expect(window.displayName == #"json:{"offset": "1k", "driver": "raw", "size": 4096, "file": {"driver": "file", "filename": "r.img"}}"#)
        let dotted = try ImageName.parse(#"json:{'driver':'qcow2','file.filename':'file:x.qcow2'}"#)
        // file.filename is never parsed for a protocol prefix (QEMU takes it as written).
        #expect(dotted.path == "file:x.qcow2")
        #expect(dotted.displayName == "file:x.qcow2")
        // Nested beats dotted, as in QEMU.
        #expect(try ImageName.parse(#"json:{"file.filename":"b","file":{"filename":"a"}}"#).path == "a")
    }

    @Test(arguments: [
        (#"json:{"driver":"qcow2"}"#, "A block device must be specified for \"file\""),
        (#"json:{}"#, "Must specify either driver or file"),
        (#"json:{"driver":"qcow2","file.filename":"x","backing":null}"#, "Block format 'qcow2' option 'backing' is not supported by simg"),
        (#"json:{"driver":"qcow2","file.filename":"x","zz":1}"#, "Block format 'qcow2' does not support the option 'zz'"),
        (#"json:{"driver":"qcow2","file.filename":"x","file.locking":"off"}"#, "Block protocol 'file' option 'locking' is not supported by simg"),
        (#"json:{"driver":"qcow2","file":{"driver":"nbd","filename":"x"}}"#, "simg does not support the 'nbd' protocol"),
        (#"json:{"driver":"vmdk","file.filename":"x"}"#, "the vmdk format is not supported yet"),
        (#"json:{"driver":7,"file.filename":"x"}"#, "Invalid parameter type for 'driver', expected: string"),
        (#"json:{"driver":"raw","file.filename":"x",}"#, "Could not parse the JSON options: JSON parse error, expecting value"),
        (#"json:{"driver":"raw","file.filename":"x"} y"#, "Could not parse the JSON options: Expecting at most one JSON value"),
        (#"json:"x""#, "Invalid JSON object given"),
        ("json:" + String(repeating: "{\"a\":", count: 100) + "1" + String(repeating: "}", count: 100),
         "Could not parse the JSON options: JSON parse error, too deeply nested"),
    ])
    func jsonRefusals(name: String, message: String) {
        do {
            _ = try ImageName.parse(name)
            Issue.record("\(name) parsed")
        } catch let error as ImageError {
            #expect(error.message == message)
            #expect(error.path == name)
        } catch {
            Issue.record("\(error)")
        }
    }
}
