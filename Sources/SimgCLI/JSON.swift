import ImageFormats

/// A small JSON model and writer that reproduces QEMU's pretty-printed JSON byte for byte.
///
/// qemu-img builds its JSON from a QDict, a hash table, and prints the members in bucket
/// order, not in the order they were added. `JSONObject.qemuOrder` recomputes that order so
/// `simg info --output=json` lists keys exactly where qemu-img puts them.
public indirect enum JSONValue: Equatable, Sendable {
    case string(String)
    case int(Int64)
    case uint(UInt64)
    case bool(Bool)
    case array([JSONValue])
    case object(JSONObject)
}

/// Members in the order they were added (QEMU's visit order): ImageFormats' ordered members.
public typealias JSONObject = OrderedMembers<JSONValue>

extension OrderedMembers where Value == JSONValue {
    /// The order qemu's qdict_first/qdict_next walk: by hash bucket (512 buckets), and within a
    /// bucket the most recently added key first (each bucket is a list with inserts at its head).
    public var qemuOrder: [(key: String, value: JSONValue)] {
        let numbered = members.enumerated().map { (bucket: QEMUJSON.bucket(of: $0.element.key), added: $0.offset, member: $0.element) }
        return numbered.sorted { a, b in
            a.bucket != b.bucket ? a.bucket < b.bucket : a.added > b.added
        }.map { $0.member }
    }

    static func bucket(of key: String) -> UInt32 { QEMUJSON.bucket(of: key) }
}

public enum JSONWriter {
    /// QEMU's pretty form: 4-space indents, `"key": value`, each member on its own line, and
    /// empty containers still broken over two lines (`[` newline indent `]`). No final newline.
    public static func pretty(_ value: JSONValue) -> String {
        var text = ""
        write(value, level: 0, into: &text)
        return text
    }

    private static func write(_ value: JSONValue, level: Int, into text: inout String) {
        switch value {
        case .string(let s): text += quote(s)
        case .int(let n): text += String(n)
        case .uint(let n): text += String(n)
        case .bool(let b): text += b ? "true" : "false"
        case .array(let items):
            text += "["
            for (i, item) in items.enumerated() {
                text += i == 0 ? "\n" : ",\n"
                text += indent(level + 1)
                write(item, level: level + 1, into: &text)
            }
            text += "\n" + indent(level) + "]"
        case .object(let object):
            text += "{"
            for (i, member) in object.qemuOrder.enumerated() {
                text += i == 0 ? "\n" : ",\n"
                text += indent(level + 1) + quote(member.key) + ": "
                write(member.value, level: level + 1, into: &text)
            }
            text += "\n" + indent(level) + "}"
        }
    }

    private static func indent(_ level: Int) -> String {
        String(repeating: " ", count: level * 4)
    }

    /// A string as QEMU's JSON writer quotes it (see QEMUJSON.quote).
    public static func quote(_ s: String) -> String { QEMUJSON.quote(s) }

}
