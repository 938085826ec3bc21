import DiskIO
import Glibc
import ImageFormats

/// `--image-opts` / `--target-image-opts` (a QemuOpts list naming an image: `driver=qcow2,
/// file.filename=disk.qcow2`) and `--object` (QEMU's user-creatable objects: secrets), shared
/// by the commands that take them. An image-opts list becomes the `json:` name with the same
/// options (`file.filename` nested as `"file": {"filename": ...}`), which ImageName+JSON.swift
/// already parses and checks with QEMU's words; failures name the list as the user wrote it.
enum ImageOpts {
    /// The list's items in order: `,,` is a comma inside a value; a later key wins. The first
    /// item without `=` is QEMU's reference to an existing block node (which simg never has);
    /// a later one is QEMU's deprecated short-form boolean (`key` = `on`, with its warning).
    struct Parsed {
        var pairs: [(key: String, value: String)] = []
        var reference: String?
    }

    static func parse(_ text: String, console: Console) -> Parsed {
        var parsed = Parsed()
        var items: [String] = []
        var current = ""
        var chars = Array(text)[...]
        while let c = chars.popFirst() {
            if c == "," {
                if chars.first == "," {
                    chars.removeFirst()
                    current.append(",")
                } else {
                    items.append(current)
                    current = ""
                }
            } else {
                current.append(c)
            }
        }
        items.append(current)
        for (index, item) in items.enumerated() {
            if let eq = item.firstIndex(of: "=") {
                parsed.pairs.append((String(item[..<eq]), String(item[item.index(after: eq)...])))
            } else if index == 0 {
                if !item.isEmpty { parsed.reference = item }
            } else {
                console.error("warning: short-form boolean option '\(item)' deprecated")
                console.err("Please use \(item)=on instead\n")
                parsed.pairs.append((item, "on"))
            }
        }
        return parsed
    }

    /// The `json:` name for `text`, or the refusal qemu-img gives for a list naming a block
    /// node ("Cannot find device=...", which names the list, as every failure here does).
    static func jsonName(_ text: String, console: Console) throws(CLIError) -> String {
        let parsed = parse(text, console: console)
        if let reference = parsed.reference {
            throw CLIError("Could not open '\(text)': " + (parsed.pairs.isEmpty
                ? "Cannot find device='\(reference)' nor node-name='\(reference)'"
                : "Cannot reference an existing block device with additional options or a new filename"))
        }
        // Dotted keys nest, in first-seen order; a later value for a key replaces it in place.
        final class Node {
            var keys: [String] = []
            var values: [String: String] = [:]
            var children: [String: Node] = [:]
            func set(_ path: ArraySlice<Substring>, _ value: String) {
                let key = String(path.first!)
                if !keys.contains(key) { keys.append(key) }
                if path.count == 1 {
                    values[key] = value
                    children[key] = nil
                } else {
                    let child = children[key] ?? Node()
                    children[key] = child
                    values[key] = nil
                    child.set(path.dropFirst(), value)
                }
            }
            var json: String {
                "{" + keys.map { key in
                    QEMUJSON.quote(key) + ":" + (children[key]?.json ?? QEMUJSON.quote(values[key] ?? ""))
                }.joined(separator: ",") + "}"
            }
        }
        let root = Node()
        for (key, value) in parsed.pairs {
            root.set(key.split(separator: ".", omittingEmptySubsequences: false)[...], value)
        }
        return "json:" + root.json
    }

    // MARK: - --object

    /// What `qemu-img --object help` lists besides secret (QEMU 7.2, Debian's build).
    static let qemuObjectTypes: Set<String> = [
        "authz-list", "authz-list-file", "authz-simple", "main-loop", "pr-manager-helper", "secret_keyring",
        "thread-context", "throttle-group", "tls-cipher-suites", "tls-creds-anon", "tls-creds-psk", "tls-creds-x509",
    ]

    /// One `--object` argument, checked as QEMU's user_creatable_process_cmdline checks it
    /// (qemu-img handles each where it meets it, so the first bad one is the first error).
    /// Only secrets exist for simg; they are accepted and unused (simg has no encryption yet:
    /// an encrypted image is refused when opened). "help" lists them (exit 0: returns true).
    static func object(_ text: String, ids: inout Set<String>, console: Console) throws(CLIError) -> Bool {
        var pairs: [(String, String)] = []
        var chars = Array(text)[...]
        var first = true
        while !chars.isEmpty || first {
            var key = "", value: String?
            while let c = chars.first, c != "=", c != "," { key.append(c); chars.removeFirst() }
            if chars.first == "=" {
                chars.removeFirst()
                var v = ""
                while let c = chars.popFirst() {
                    if c == "," {
                        if chars.first == "," { chars.removeFirst(); v.append(",") } else { break }
                    } else {
                        v.append(c)
                    }
                }
                value = v
            } else {
                if chars.first == "," { chars.removeFirst() }
                if first {
                    // The implied key: the object's type.
                    value = key
                    key = "qom-type"
                } else if key != "help" {
                    throw CLIError("Expected '=' after parameter '\(key)'")
                }
            }
            first = false
            pairs.append((key, value ?? ""))
        }
        func last(_ key: String) -> String? { pairs.last(where: { $0.0 == key })?.1 }
        if last("qom-type") == "help" || (pairs.count == 1 && pairs[0].0 == "help") {
            console.out("List of user creatable objects:\n  secret\n")
            return true
        }
        guard let type = last("qom-type") else { throw CLIError("Parameter 'qom-type' is missing") }
        guard type == "secret" else {
            // A type qemu-img 7.2 creates but simg has no use for: said so, rather than
            // QEMU's sentence for a type that does not exist.
            if qemuObjectTypes.contains(type) {
                throw CLIError("Object type '\(type)' is not supported by simg (only 'secret' is)")
            }
            throw CLIError("Parameter 'qom-type' does not accept value '\(type)'")
        }
        if pairs.contains(where: { $0.0 == "help" }) {
            console.out("secret options:\n  data=<string>\n  file=<string>\n  format=<QCryptoSecretFormat>\n"
                        + "  iv=<string>\n  keyid=<string>\n  loaded=<bool>\n")
            return true
        }
        guard let id = last("id") else { throw CLIError("Parameter 'id' is missing") }
        let idOK = id.first.map { $0.isASCII && $0.isLetter } == true
            && id.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "-._".contains($0)) }
        guard idOK else {
            throw CLIError("Parameter 'id' expects an identifier\n"
                           + "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
        }
        let known: Set<String> = ["qom-type", "id", "data", "file", "format", "iv", "keyid", "loaded"]
        if let bad = pairs.first(where: { !known.contains($0.0) }) {
            throw CLIError("Parameter '\(bad.0)' is unexpected")
        }
        if let format = last("format"), format != "raw" && format != "base64" {
            throw CLIError("Parameter 'format' does not accept value '\(format)'")
        }
        let data = last("data"), file = last("file")
        if data != nil && file != nil { throw CLIError("'file' and 'data' are mutually exclusive") }
        if data == nil && file == nil { throw CLIError("Either 'file' or 'data' must be provided") }
        if let file {
            do {
                let handle = try DiskFile.open(file, access: .readOnly)
                handle.close()
            } catch let error as IOError {
                throw CLIError("Unable to read \(file): Failed to open file \u{201C}\(file)\u{201D}: "
                               + IOError.describe(errno: error.code))
            } catch {
                throw CLIError("Unable to read \(file): \(error)")
            }
        }
        if !ids.insert(id).inserted {
            throw CLIError("attempt to add duplicate property '\(id)' to object (type 'container')")
        }
        return false
    }
}
