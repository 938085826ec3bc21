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
                // QemuOpts asks for help with a bare "help" or "?" (no warning); the source
                // list has no help of its own, so the block layer then refuses the option.
                if item != "help" && item != "?" {
                    console.error("warning: short-form boolean option '\(item)' deprecated")
                    console.err("Please use \(item)=on instead\n")
                }
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
        // QEMU keeps the options flat: a child given both as a reference (`file=NAME`) and by
        // options of its own (`file.filename=...`) is refused when the node is opened.
        // (QEMU's check for the protocol child, `file`; others fail otherwise, in the json: layer.)
        let keys = Set(parsed.pairs.map(\.key))
        if keys.contains("file"), keys.contains(where: { $0.hasPrefix("file.") }) {
            throw CLIError("Could not open '\(text)': "
                           + "Cannot reference an existing block device with additional options or a new filename")
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

    /// The secrets defined so far (`--object` is handled in command-line order): each id and
    /// the length of its value, nil while it is being made (QEMU adds the object before it
    /// loads it, so a secret naming itself as its `keyid` has "no data").
    struct Secrets {
        var lengths: [String: Int?] = [:]
    }

    /// At most this much of a secret's `file=` is read (qemu-img reads any size; a secret is
    /// a few bytes, and /dev/zero would never end).
    static let secretFileLimit = 1 << 20

    /// One `--object` argument, checked as QEMU's user_creatable_process_cmdline checks it and
    /// in its order: the keyval parse, qom-type and id, the secret's members as QAPI visits
    /// them (loaded, format, then unexpected ones), its properties set (loaded is read-only),
    /// the object added (a duplicate id), then completed (data or file, the file read, keyid,
    /// base64). Only secrets exist for simg; they are checked and unused (simg has no
    /// encryption yet: an encrypted image is refused when opened). "help" lists them (exit 0:
    /// returns true).
    static func object(_ text: String, secrets: inout Secrets, console: Console) throws(CLIError) -> Bool {
        let pairs = try keyval(text)
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
            // (loaded, deprecated, is not listed by QEMU either.)
            console.out("secret options:\n  data=<string>\n  file=<string>\n  format=<QCryptoSecretFormat>\n"
                        + "  iv=<string>\n  keyid=<string>\n")
            return true
        }
        guard let id = last("id") else { throw CLIError("Parameter 'id' is missing") }
        let idOK = id.first.map { $0.isASCII && $0.isLetter } == true
            && id.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "-._".contains($0)) }
        guard idOK else {
            throw CLIError("Parameter 'id' expects an identifier\n"
                           + "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
        }
        let loaded = last("loaded")
        if let loaded, !["on", "off", "yes", "no", "true", "false", "y", "n"].contains(loaded) {
            throw CLIError("Parameter 'loaded' expects 'on' or 'off'")
        }
        let base64: Bool
        switch last("format") {
        case nil, "raw": base64 = false
        case "base64": base64 = true
        case let format?: throw CLIError("Parameter 'format' does not accept value '\(format)'")
        }
        let known: Set<String> = ["qom-type", "id", "data", "file", "format", "iv", "keyid", "loaded"]
        if let bad = pairs.first(where: { !known.contains($0.0) }) {
            throw CLIError("Parameter '\(bad.0)' is unexpected")
        }
        if loaded != nil { throw CLIError("Property 'secret.loaded' is not writable") }
        if secrets.lengths[id] != nil {
            throw CLIError("attempt to add duplicate property '\(id)' to object (type 'container')")
        }
        secrets.lengths[id] = .some(nil)

        let data = last("data"), file = last("file")
        if data != nil && file != nil { throw CLIError("'file' and 'data' are mutually exclusive") }
        let value: [UInt8]
        if let file {
            value = try secretFile(file)
        } else if let data {
            value = Array(data.utf8)
        } else {
            throw CLIError("Either 'file' or 'data' must be provided")
        }
        if let keyid = last("keyid") {
            // QEMU decrypts the value with secret `keyid` (AES-256-CBC); simg cannot.
            guard let known = secrets.lengths[keyid] else { throw CLIError("No secret with id '\(keyid)'") }
            guard let keyLength = known else { throw CLIError("Secret with id '\(keyid)' has no data") }
            if keyLength != 32 { throw CLIError("Key should be 32 bytes in length") }
            guard let iv = last("iv") else { throw CLIError("IV is required to decrypt secret") }
            try checkBase64(Array(iv.utf8))
            let ivLength = base64Length(Array(iv.utf8))
            if ivLength != 16 { throw CLIError("IV should be 16 bytes in length not \(ivLength)") }
            throw CLIError("Secret '\(id)' is encrypted with secret '\(keyid)': simg does not decrypt secrets")
        }
        if base64 { try checkBase64(value) }
        secrets.lengths[id] = .some(base64 ? base64Length(value) : value.count)
        return false
    }

    /// QEMU's keyval parse of an --object argument: KEY=VALUE pairs, `,,` a comma in a value,
    /// the first item without `=` the object's type (qom-type), `help` alone as a key.
    private static func keyval(_ text: String) throws(CLIError) -> [(String, String)] {
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
        return pairs
    }

    /// A secret's `file=`, read whole as g_file_get_contents reads it, in glib's words.
    private static func secretFile(_ file: String) throws(CLIError) -> [UInt8] {
        do {
            return try SmallFile.read(file, limit: secretFileLimit)
        } catch {
            switch error {
            case .open(let code):
                throw CLIError("Unable to read \(file): Failed to open file \u{201C}\(file)\u{201D}: "
                               + IOError.describe(errno: code))
            case .read(let code):
                throw CLIError("Unable to read \(file): Error reading file \u{201C}\(file)\u{201D}: "
                               + IOError.describe(errno: code))
            case .tooLarge(let limit):
                throw CLIError("Unable to read \(file): simg reads secret files of at most \(limit) bytes")
            }
        }
    }

    /// qbase64_decode's checks: no NUL inside, only base64 characters (and newlines).
    private static func checkBase64(_ bytes: [UInt8]) throws(CLIError) {
        if bytes.contains(0) { throw CLIError("Base64 data contains embedded NUL characters") }
        let valid = Set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n".utf8)
        if !bytes.allSatisfy(valid.contains) { throw CLIError("Base64 data contains invalid characters") }
    }

    /// How many bytes g_base64_decode makes of checked base64: 3 per complete group of four
    /// characters (newlines skipped; a trailing incomplete group is dropped), less the padding.
    private static func base64Length(_ bytes: [UInt8]) -> Int {
        let chars = bytes.filter { $0 != UInt8(ascii: "\n") }
        let used = chars.prefix(chars.count / 4 * 4)
        let padding = min(2, used.reversed().prefix { $0 == UInt8(ascii: "=") }.count)
        return used.count / 4 * 3 - (used.isEmpty ? 0 : padding)
    }
}
