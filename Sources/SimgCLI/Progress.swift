import DiskIO
import Glibc

/// The progress output of the long commands (convert, rebase, commit, compare, amend, check -r):
///
/// - `-p`: qemu-img's meter on stdout, util/qemu-progress.c to the byte: `    (%3.2f/100%)\r`
///   of a float percentage, printed when it moved by more than the command's minimum step
///   (`minSkip`) or is exactly 0 or 100, and a newline at the end (`end`). Off under `-q`, as
///   in qemu-img. Tools (vdsm, CDI) parse these lines, so the values are computed in qemu's
///   float arithmetic and each command feeds the meter at the points qemu-img does.
/// - `--progress=json` (simg's own): one JSON object per line on stderr,
///   `{"phase":"copy","done":N,"total":M}` (bytes), at most ten a second, and a final line
///   with done == total when a phase completes. Kept under `-q` (it was asked for by name, and
///   `-q` silences what is meant for people). Both may be given; they go to different streams.
///
/// Without `-p`, SIGUSR1 asks for one line on stderr, as in qemu-img (qemu-progress.c's dummy
/// meter; convert starts counting qemu's values on the first request, so the first answer is
/// where the copy is).
///
/// Called from the command's thread only (the convert pipeline and compare report on it).
final class Progress: @unchecked Sendable {
    /// The options every command with progress takes: `-p`, and the long `--progress=FORMAT`
    /// (its own key; qemu-img 7.2 has no `--progress`, so nothing clashes).
    static let optionSpecs: [OptionSpec] = [
        .flag("p", "progress"),
        OptionSpec(long: "progress", takesValue: true, key: "progress-format"),
    ]

    private let console: Console
    private var meter: QemuProgressMeter?
    /// Without `-p` (or under `-q`): qemu's dummy meter, which keeps the same state and, when
    /// SIGUSR1 asked for it, prints its next line on stderr (`    (NN.NN/100%)` and a newline).
    private var requested: QemuProgressMeter?
    private let json: JSONProgressLines?

    /// Whether anything is shown at all (callers skip work that only feeds the output).
    var isActive: Bool { meter != nil || json != nil }
    /// Whether only SIGUSR1 can ask for a line (no -p, no json): work that only feeds the
    /// output can wait for `requestPending`.
    var answersRequestsOnly: Bool { !isActive && requested != nil }
    /// A SIGUSR1 request is waiting for the meter's next line.
    static var requestPending: Bool { ProgressRequest.isPending }

    private init(console: Console, meter: QemuProgressMeter?, requested: QemuProgressMeter?, json: JSONProgressLines?) {
        self.console = console
        self.meter = meter
        self.requested = requested
        self.json = json
    }

    /// The output `scan` asks for; `minSkip` is the command's qemu_progress_init step.
    /// `--progress=` takes only `json`. `onRequest`: without -p, SIGUSR1 asks for a line, as
    /// qemu_progress_init sets up (check, where qemu-img has no meter, passes false).
    static func make(_ scan: ScanResult, minSkip: Float, console: Console, onRequest: Bool = true) throws -> Progress {
        try checkFormat(scan)
        let shown = scan.has("progress") && !scan.has("quiet")
        let meter = shown ? QemuProgressMeter(minSkip: minSkip) : nil
        var requested: QemuProgressMeter?
        if !shown && onRequest {
            ProgressRequest.install()
            requested = QemuProgressMeter(minSkip: minSkip)
        }
        let json = scan.has("progress-format") ? JSONProgressLines(console: console) : nil
        return Progress(console: console, meter: meter, requested: requested, json: json)
    }

    /// A `--progress=` value other than json is a usage mistake, found before anything runs.
    static func checkFormat(_ scan: ScanResult) throws {
        for value in scan.values("progress-format") where value != "json" {
            throw CLIError.usage("--progress expects 'json', not '\(value)'")
        }
    }

    /// qemu_progress_print(delta, max): with `max` 0, `delta` is the new percentage; else the
    /// meter advances by `delta` percent of `max` percent.
    func meter(_ delta: Float, max: Int) {
        if let line = meter?.advance(delta, max: max) { console.out(line) }
        // progress_dummy_print: called where the meter would print; prints if asked since.
        if requested?.advance(delta, max: max) != nil, ProgressRequest.take(), let value = requested?.current {
            console.err("    (" + QemuProgressMeter.format(value) + "/100%)\n")
        }
    }

    /// qemu_progress_end: the meter's newline.
    func end() {
        if meter != nil { console.out("\n") }
    }

    /// `done` of `total` bytes in `phase` (throttled to ten lines a second).
    func bytes(_ phase: String, done: UInt64, total: UInt64) {
        json?.report(phase, done: done, total: total, final: false)
    }

    /// `phase` complete: its final line, done == total.
    func finish(_ phase: String, total: UInt64) {
        json?.report(phase, done: total, total: total, final: true)
    }
}

/// util/qemu-progress.c's state and print rule, in its float arithmetic.
struct QemuProgressMeter {
    private(set) var current: Float = 0
    private var lastPrint: Float = 0
    let minSkip: Float

    init(minSkip: Float) { self.minSkip = minSkip }

    /// The line qemu_progress_print(delta, max) prints, if it prints one.
    mutating func advance(_ delta: Float, max: Int) -> String? {
        var next: Float = max == 0 ? delta : current + delta / 100 * Float(max)
        if next > 100 { next = 100 }
        current = next
        guard next > lastPrint + minSkip || next < lastPrint - minSkip || next == 100 || next == 0 else { return nil }
        lastPrint = current
        return QemuProgressMeter.line(current)
    }

    /// `    (%3.2f/100%)\r` (progress_simple_print).
    static func line(_ value: Float) -> String { "    (" + format(value) + "/100%)\r" }

    /// printf's `%3.2f` of the float promoted to double: glibc's exact decimal rounding (ties
    /// of the binary value to even: 3.125 prints 3.12, 9.375 prints 9.38).
    static func format(_ value: Float) -> String {
        var buffer = [CChar](repeating: 0, count: 32)
        let count = buffer.count
        let written = buffer.withUnsafeMutableBufferPointer { out in
            // Sound: vsnprintf writes at most `count` bytes into the buffer it is given.
            withVaList([Double(value)]) { vsnprintf(out.baseAddress, count, "%3.2f", $0) }
        }
        // "100.00" at most (the value is clamped to 0...100): always fits.
        let length = Int(max(0, min(written, Int32(count - 1))))
        return String(decoding: buffer.prefix(length).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// `--progress=json`'s lines: at most one per 100 ms (monotonic clock) within a run, every
/// final one written; `done` never goes backwards within a phase and never exceeds `total`.
final class JSONProgressLines {
    private let console: Console
    private var lastLine: Double = -.infinity
    private var phase = ""
    private var lastDone: UInt64 = 0
    static let interval = 0.1

    init(console: Console) { self.console = console }

    func report(_ phase: String, done: UInt64, total: UInt64, final: Bool) {
        if phase != self.phase {
            self.phase = phase
            lastDone = 0
        }
        let value = min(max(done, lastDone), total)
        lastDone = value
        let now = JSONProgressLines.now()
        guard final || now - lastLine >= JSONProgressLines.interval else { return }
        lastLine = now
        // Phase names are fixed ASCII words: nothing to escape.
        console.err("{\"phase\":\"\(phase)\",\"done\":\(value),\"total\":\(total)}\n")
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
