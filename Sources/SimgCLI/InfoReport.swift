import ImageFormats

/// Turns `ImageInfo` into qemu-img 7.2's `info` output, human or JSON.
///
/// Both forms are built from one JSON object, as qemu-img does: its human "Format specific
/// information" section is a dump of the same QDict, so it shares the JSON key order.
public enum InfoReport {
    /// The ImageInfo object, members added in QEMU's QAPI visit order (it matters only for keys
    /// that share a hash bucket; see `JSONObject.qemuOrder`).
    public static func json(_ info: ImageInfo) -> JSONObject {
        var object = JSONObject()
        object["filename"] = .string(info.filename)
        object["format"] = .string(info.format)
        if let dirty = info.dirtyFlag { object["dirty-flag"] = .bool(dirty) }
        if let actual = info.actualSize { object["actual-size"] = .uint(actual) }
        object["virtual-size"] = .uint(info.virtualSize)
        if let cluster = info.clusterSize { object["cluster-size"] = .int(Int64(cluster)) }
        // qemu-img reports "encrypted" only for encrypted images.
        if info.encrypted == true { object["encrypted"] = .bool(true) }
        if let backing = info.backingFilename { object["backing-filename"] = .string(backing) }
        if let full = info.fullBackingFilename { object["full-backing-filename"] = .string(full) }
        if let format = info.backingFilenameFormat { object["backing-filename-format"] = .string(format) }
        if !info.snapshots.isEmpty { object["snapshots"] = .array(info.snapshots.map { .object(json($0)) }) }
        if let specific = info.formatSpecific {
            object["format-specific"] = .object(JSONObject([("type", .string(specific.type)),
                                                            ("data", .object(json(specific.data)))]))
        }
        return object
    }

    static func json(_ snapshot: SnapshotInfo) -> JSONObject {
        var object = JSONObject()
        object["id"] = .string(snapshot.id)
        object["name"] = .string(snapshot.name)
        object["vm-state-size"] = .uint(snapshot.vmStateSize)
        object["date-sec"] = .uint(snapshot.dateSeconds)
        object["date-nsec"] = .uint(snapshot.dateNanoseconds)
        object["vm-clock-sec"] = .uint(snapshot.vmClockNanoseconds / 1_000_000_000)
        object["vm-clock-nsec"] = .uint(snapshot.vmClockNanoseconds % 1_000_000_000)
        if let icount = snapshot.icount { object["icount"] = .uint(icount) }
        return object
    }

    /// A format's neutral data as JSON, members in the order the format added them.
    static func json(_ object: InfoObject) -> JSONObject {
        var result = JSONObject()
        for member in object.members { result[member.key] = json(member.value) }
        return result
    }

    static func json(_ value: InfoValue) -> JSONValue {
        switch value {
        case .string(let s): return .string(s)
        case .int(let n): return .int(n)
        case .uint(let n): return .uint(n)
        case .bool(let b): return .bool(b)
        case .list(let items): return .array(items.map { json($0) })
        case .object(let object): return .object(json(object))
        }
    }

    /// `--output=json`: one object, or for `--backing-chain` an array of them. Ends in a newline.
    public static func jsonText(_ infos: [ImageInfo], chain: Bool) -> String {
        let objects = infos.map { JSONValue.object(json($0)) }
        let value = chain ? JSONValue.array(objects) : objects.first ?? .array([])
        return JSONWriter.pretty(value) + "\n"
    }

    /// `--output=human` for a chain: the images separated by blank lines.
    public static func humanText(_ infos: [ImageInfo]) -> String {
        infos.map(human).joined(separator: "\n")
    }

    /// The human form of one image, every line ending in a newline.
    public static func human(_ info: ImageInfo) -> String {
        var text = "image: \(info.filename)\n"
        text += "file format: \(info.format)\n"
        text += "virtual size: \(TextFormat.size(info.virtualSize)) (\(info.virtualSize) bytes)\n"
        text += "disk size: \(info.actualSize.map(TextFormat.size) ?? "unavailable")\n"
        if info.encrypted == true { text += "encrypted: yes\n" }
        if let cluster = info.clusterSize { text += "cluster_size: \(cluster)\n" }
        if info.dirtyFlag == true { text += "cleanly shut down: no\n" }
        if let backing = info.backingFilename {
            text += "backing file: \(backing)"
            if let full = info.fullBackingFilename {
                if full != backing { text += " (actual path: \(full))" }
            } else {
                text += " (cannot determine actual path)"
            }
            text += "\n"
            if let format = info.backingFilenameFormat { text += "backing file format: \(format)\n" }
        }
        if !info.snapshots.isEmpty {
            text += "Snapshot list:\n" + snapshotHeader + "\n"
            for snapshot in info.snapshots { text += snapshotRow(snapshot) + "\n" }
        }
        if let specific = info.formatSpecific {
            text += "Format specific information:\n"
            text += dump(.object(json(specific.data)), level: 1)
        }
        return text
    }

    /// The snapshot table's columns: ID and TAG left-aligned, the rest right-aligned.
    static let snapshotHeader = TextFormat.left("ID", 10) + TextFormat.left("TAG", 17)
        + TextFormat.right("VM SIZE", 8) + TextFormat.right("DATE", 20)
        + TextFormat.right("VM CLOCK", 13) + TextFormat.right("ICOUNT", 11)

    static func snapshotRow(_ snapshot: SnapshotInfo) -> String {
        TextFormat.left(snapshot.id, 9) + " " + TextFormat.left(snapshot.name, 16) + " "
            + TextFormat.right(TextFormat.size(snapshot.vmStateSize), 8)
            + TextFormat.right(TextFormat.localDate(seconds: snapshot.dateSeconds), 20)
            + TextFormat.right(TextFormat.vmClock(nanoseconds: snapshot.vmClockNanoseconds), 13)
            + TextFormat.right(snapshot.icount.map { String($0) } ?? "", 11)
    }

    /// qemu's human dump of a QObject: "key: value" per scalar, "key:" then the members one level
    /// deeper for containers, list items as "[i]:", dashes in keys shown as spaces, 4 spaces a level.
    static func dump(_ value: JSONValue, level: Int) -> String {
        let indent = String(repeating: " ", count: level * 4)
        var text = ""
        switch value {
        case .object(let object):
            for member in object.qemuOrder {
                let key = member.key.replacingDashes()
                text += indent + key + ":" + (member.value.isContainer ? "\n" : " ")
                text += dump(member.value, level: level + 1)
            }
        case .array(let items):
            for (i, item) in items.enumerated() {
                text += indent + "[\(i)]:" + (item.isContainer ? "\n" : " ")
                text += dump(item, level: level + 1)
            }
        case .string(let s): text += s + "\n"
        case .int(let n): text += "\(n)\n"
        case .uint(let n): text += "\(n)\n"
        case .bool(let b): text += (b ? "true" : "false") + "\n"
        }
        return text
    }
}

extension JSONValue {
    var isContainer: Bool {
        switch self {
        case .object, .array: return true
        default: return false
        }
    }
}

extension String {
    fileprivate func replacingDashes() -> String {
        String(map { $0 == "-" ? " " : $0 })
    }
}
