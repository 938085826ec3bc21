import Foundation
import Testing
import TestSupport

/// One hostile image: a template patched into something out of range, and what each command
/// must do with it.
struct HostileCase: Sendable, CustomTestStringConvertible {
    enum Outcome: Sendable {
        /// Refused at open: info, info --output=json and convert exit 1 and name the file;
        /// check exits with `check`: 1 when it cannot open the image either, else qemu-img
        /// check's status for the same damage (its own table checks find it).
        case refused(check: Int32 = 1)
        /// Opens (info and info --output=json exit 0) but the data cannot be read: convert
        /// exits 1 naming the file; check exits with `check` (qemu-img's status).
        case readFails(check: Int32)
        /// Not an error for anyone (unknown compatible bits, limits reached but not passed):
        /// everything exits 0 except check, which exits with `check`.
        case accepted(check: Int32)
    }

    /// How qemu-img 7.2 treats the same image.
    enum Qemu: Sendable {
        /// Same exit status for info and check (qemu-img is run to confirm it).
        case agrees
        /// qemu-img behaves otherwise (it reads past the end of the file as zeros, does not
        /// check the field, or fails itself): the reason is in `note`; not compared.
        case differs
    }

    var name: String
    var template: String
    var outcome: Outcome
    var qemu: Qemu
    /// Why simg differs from qemu-img, for `.opensIt`.
    var note: String
    /// "-f qcow2" for every command (when the damage makes the probe call it something else).
    var format: String?
    /// The image file is made sparse up to this size after patching.
    var fileSize: UInt64?
    var patch: @Sendable (inout [UInt8]) -> Void
    /// The wall-time bound for check. One second everywhere except where the debug build
    /// the tests run is known to need longer on a legitimate image at QEMU's limits (the
    /// release build's figure is in the case's comment).
    var checkSeconds = HostileLimits.seconds

    var testDescription: String { name }

    init(_ name: String, _ template: String = "64k", _ outcome: Outcome = .refused(), qemu: Qemu = .agrees,
         note: String = "", format: String? = nil, fileSize: UInt64? = nil,
         _ patch: @escaping @Sendable (inout [UInt8]) -> Void) {
        self.name = name
        self.template = template
        self.outcome = outcome
        self.qemu = qemu
        self.note = note
        self.format = format
        self.fileSize = fileSize
        self.patch = patch
    }

    /// A case setting one 32-bit header field.
    static func field32(_ name: String, _ offset: Int, _ value: UInt32, _ template: String = "64k",
                        _ outcome: Outcome = .refused(), qemu: Qemu = .agrees, note: String = "") -> HostileCase {
        HostileCase(name, template, outcome, qemu: qemu, note: note) { hostilePut32(&$0, offset, value) }
    }

    /// A case setting one 64-bit header field.
    static func field64(_ name: String, _ offset: Int, _ value: UInt64, _ template: String = "64k",
                        _ outcome: Outcome = .refused(), qemu: Qemu = .agrees, note: String = "") -> HostileCase {
        HostileCase(name, template, outcome, qemu: qemu, note: note) { hostilePut64(&$0, offset, value) }
    }
}

/// Writes the case's image into `dir` and returns its path.
func hostileMakeImage(_ c: HostileCase, in dir: TempDir) throws -> String {
    var bytes = try HostileTemplates.shared.get()[c.template]
    c.patch(&bytes)
    let path = dir.file("\(c.name).qcow2")
    try Data(bytes).write(to: URL(fileURLWithPath: path))
    if let size = c.fileSize { #expect(truncate(path, off_t(size)) == 0) }
    return path
}

/// Runs info, info --output=json, check and convert -O raw on the case's image and checks each
/// against the case's outcome, the time and memory bounds, and qemu-img's exit statuses.
func hostileVerify(_ c: HostileCase, sourceLocation: SourceLocation = #_sourceLocation) throws {
    let dir = try TempDir()
    let image = try hostileMakeImage(c, in: dir)
    let f = c.format.map { ["-f", $0] } ?? []
    let info = try hostileRun(["info"] + f + [image])
    let json = try hostileRun(["info", "--output=json"] + f + [image])
    let check = try hostileRun(["check"] + f + [image], seconds: c.checkSeconds)
    let convert = try hostileRun(["convert"] + f + ["-O", "raw", image, dir.file("out.raw")])
    let runs = [("info", info), ("info --output=json", json), ("check", check), ("convert", convert)]
    for (what, r) in runs {
        hostileExpectBounded(r, "\(c.name): \(what)", seconds: what == "check" ? c.checkSeconds : HostileLimits.seconds,
                             sourceLocation: sourceLocation)
    }

    func expectFails(_ what: String, _ r: HostileRun) {
        #expect(r.status == 1, "\(c.name): \(what) should exit 1: \(r)", sourceLocation: sourceLocation)
        #expect(r.stderr.contains(image), "\(c.name): \(what) should name \(image): \(r)", sourceLocation: sourceLocation)
    }
    func expectSucceeds(_ what: String, _ r: HostileRun) {
        #expect(r.status == 0, "\(c.name): \(what) should exit 0: \(r)", sourceLocation: sourceLocation)
    }
    var checkStatus: Int32 = 1
    switch c.outcome {
    case .refused(let status):
        for (what, r) in runs where what != "check" { expectFails(what, r) }
        checkStatus = status
        #expect(check.status == status && !check.stderr.isEmpty, "\(c.name): check should exit \(status): \(check)",
                sourceLocation: sourceLocation)
        // A check that cannot open the image names it; one that opened it and gave up says
        // qemu-img's "Check failed: <reason>", which names no file (qemu-img's neither).
        if check.status == 1 {
            #expect(check.stderr.contains(image) || check.stderr.contains("Check failed"),
                    "\(c.name): check should name \(image): \(check)", sourceLocation: sourceLocation)
        }
    case .readFails(let status):
        expectSucceeds("info", info)
        expectSucceeds("info --output=json", json)
        expectFails("convert", convert)
        checkStatus = status
        #expect(check.status == status, "\(c.name): check should exit \(status): \(check)", sourceLocation: sourceLocation)
    case .accepted(let status):
        expectSucceeds("info", info)
        expectSucceeds("info --output=json", json)
        expectSucceeds("convert", convert)
        checkStatus = status
        #expect(check.status == status, "\(c.name): check should exit \(status): \(check)", sourceLocation: sourceLocation)
    }

    guard case .agrees = c.qemu else { return }
    let qInfo = try hostileQemuImg(["info"] + f + [image])
    #expect(qInfo.status == info.status, "\(c.name): qemu-img info exits \(qInfo.status): \(qInfo.stderr)",
            sourceLocation: sourceLocation)
    let qCheck = try hostileQemuImg(["check"] + f + [image])
    #expect(qCheck.status == checkStatus, "\(c.name): qemu-img check exits \(qCheck.status): \(qCheck.stderr)",
            sourceLocation: sourceLocation)
}
