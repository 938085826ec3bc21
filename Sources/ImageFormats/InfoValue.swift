/// Format-specific facts `info` reports, as neutral data: the CLI prints any format's section
/// (qemu-img's "Format specific information", `format-specific` in JSON) without knowing the
/// format. Mirrors the QAPI values QEMU builds that section from.
public indirect enum InfoValue: Sendable, Equatable {
    case string(String)
    case int(Int64)
    case uint(UInt64)
    case bool(Bool)
    case list([InfoValue])
    case object(InfoObject)

    public var stringValue: String? {
        if case .string(let s) = self { return s }
        return nil
    }

    public var boolValue: Bool? {
        if case .bool(let b) = self { return b }
        return nil
    }

    /// An `.int` or `.uint` that fits Int64.
    public var intValue: Int64? {
        switch self {
        case .int(let n): return n
        case .uint(let n): return Int64(exactly: n)
        default: return nil
        }
    }

    public var listValue: [InfoValue]? {
        if case .list(let items) = self { return items }
        return nil
    }

    public var objectValue: InfoObject? {
        if case .object(let object) = self { return object }
        return nil
    }
}

/// Key → value members in the order they were added, as a QDict is built (setting a key
/// again replaces its value in place, as qdict_put does). For `info` data that order must be
/// QEMU's QAPI visit order: qemu-img lists keys by hash bucket, and keys that share a bucket
/// come out in reverse order of addition (SimgCLI's `JSONObject.qemuOrder`). SimgCLI's JSON
/// objects are the same type over its `JSONValue`.
public struct OrderedMembers<Value: Equatable & Sendable>: Sendable, Equatable {
    public private(set) var members: [(key: String, value: Value)] = []

    public init() {}

    public init(_ members: [(String, Value)]) {
        for (key, value) in members { self[key] = value }
    }

    /// Setting an existing key replaces its value in place; nil removes it.
    public subscript(key: String) -> Value? {
        get { members.first { $0.key == key }?.value }
        set {
            if let at = members.firstIndex(where: { $0.key == key }) {
                if let newValue { members[at].value = newValue } else { members.remove(at: at) }
            } else if let newValue {
                members.append((key, newValue))
            }
        }
    }

    public static func == (a: OrderedMembers, b: OrderedMembers) -> Bool {
        a.members.count == b.members.count
            && zip(a.members, b.members).allSatisfy { $0.key == $1.key && $0.value == $1.value }
    }
}

/// A format's `info` object: members in QEMU's QAPI visit order.
public typealias InfoObject = OrderedMembers<InfoValue>

/// One format's section of `info`: QEMU's ImageInfoSpecific, a union tagged by `type` (the
/// format's name, "qcow2") whose `data` is that format's object.
public struct FormatSpecificInfo: Sendable, Equatable {
    public var type: String
    public var data: InfoObject

    public init(type: String, data: InfoObject) {
        self.type = type
        self.data = data
    }
}
