import Testing
@testable import SimgCLI

@Suite struct JSONTests {
    @Test func escapingLikeQemu() {
        #expect(JSONWriter.quote("plain") == "\"plain\"")
        #expect(JSONWriter.quote("a\"b\\c") == "\"a\\\"b\\\\c\"")
        #expect(JSONWriter.quote("\u{08}\u{0C}\n\r\t") == "\"\\b\\f\\n\\r\\t\"")
        #expect(JSONWriter.quote("\u{01}\u{1F}\u{7F}") == "\"\\u0001\\u001F\\u007F\"")
        #expect(JSONWriter.quote("é€") == "\"\\u00E9\\u20AC\"")
        #expect(JSONWriter.quote("😀") == "\"\\uD83D\\uDE00\"")
        #expect(JSONWriter.quote("/ ~") == "\"/ ~\"")
    }

    @Test func bucketOrderMatchesQemu() {
        // The order qemu-img 7.2 prints these ImageInfo keys in.
        var object = JSONObject()
        for key in ["filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size",
                    "backing-filename", "full-backing-filename", "backing-filename-format",
                    "snapshots", "format-specific"] {
            object[key] = .int(0)
        }
        #expect(object.qemuOrder.map(\.key) == [
            "backing-filename-format", "snapshots", "virtual-size", "filename", "cluster-size",
            "format", "actual-size", "format-specific", "full-backing-filename", "backing-filename",
            "dirty-flag",
        ])
        #expect(JSONObject.bucket(of: "compat") == 16)
        #expect(JSONObject.bucket(of: "extended-l2") == 503)
    }

    @Test func sameBucketPutsTheLaterKeyFirst() {
        // Find two keys sharing a bucket, then check the later-added one comes first.
        let first = "k0"
        let bucket = JSONObject.bucket(of: first)
        var second = ""
        for i in 1..<100_000 where JSONObject.bucket(of: "k\(i)") == bucket {
            second = "k\(i)"
            break
        }
        #expect(!second.isEmpty)
        let object = JSONObject([(first, .int(1)), (second, .int(2))])
        #expect(object.qemuOrder.map(\.key) == [second, first])
    }

    @Test func replacingAValueKeepsItsPlace() {
        var object = JSONObject([("a", .int(1)), ("b", .int(2))])
        object["a"] = .int(3)
        #expect(object.members.map(\.key) == ["a", "b"])
        #expect(object["a"] == .int(3))
        object["a"] = nil
        #expect(object.members.map(\.key) == ["b"])
    }

    @Test func prettyLayout() {
        // Buckets: "flags" 20 < "list" 81, "type" 425 < "data" 505, so this is qemu's order.
        let value = JSONValue.object(JSONObject([
            ("type", .string("qcow2")),
            ("data", .object(JSONObject([("list", .array([.bool(true), .uint(7)])), ("flags", .array([]))]))),
        ]))
        let expected = """
            {
                "type": "qcow2",
                "data": {
                    "flags": [
                    ],
                    "list": [
                        true,
                        7
                    ]
                }
            }
            """
        #expect(JSONWriter.pretty(value) == expected)
        #expect(JSONWriter.pretty(.array([])) == "[\n]")
        #expect(JSONWriter.pretty(.object(JSONObject())) == "{\n}")
        #expect(JSONWriter.pretty(.int(-5)) == "-5")
    }
}
