import CLinuxShims
import Glibc

/// The process was asked to stop by SIGINT or SIGTERM while a long operation ran.
public struct InterruptedError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The signal number (SIGINT or SIGTERM).
    public var signal: Int32
    /// The image left unfinished, when the code that stopped knows it.
    public var image: String?
    /// What state the image is in, after its name ("is incomplete").
    public var outcome: String

    public init(signal: Int32, image: String? = nil, outcome: String = "is incomplete") {
        self.signal = signal
        self.image = image
        self.outcome = outcome
    }

    /// The same interruption, naming `image` (unless an inner layer already named one).
    public func naming(_ image: String, outcome: String = "is incomplete") -> InterruptedError {
        if self.image != nil { return self }
        return InterruptedError(signal: signal, image: image, outcome: outcome)
    }

    /// "SIGINT", "SIGTERM", or "signal N" for anything else.
    public var signalName: String {
        switch signal {
        case SIGINT: return "SIGINT"
        case SIGTERM: return "SIGTERM"
        case SIGHUP: return "SIGHUP"
        default: return "signal \(signal)"
        }
    }

    /// "interrupted by SIGINT; 'out.qcow2' is incomplete".
    public var description: String {
        guard let image else { return "interrupted by \(signalName)" }
        return "interrupted by \(signalName); '\(image)' \(outcome)"
    }
}

/// Cooperative interruption. `install()` sets a SIGINT/SIGTERM handler that only records the
/// signal (the C handler is async-signal-safe); long loops call `check()` between requests and
/// unwind with `InterruptedError`, so files are closed with their on-disk state consistent.
/// The handler resets itself to the default disposition: a second Ctrl-C kills at once.
///
/// The handler is installed without SA_RESTART, so a blocking system call returns EINTR;
/// DiskFile and the I/O engines retry those, and the next `check()` sees the signal.
public enum Interruption {
    /// Installs the SIGINT/SIGTERM handler. A signal ignored on entry (a background job of a
    /// non-interactive shell) is left ignored. Calling it again is harmless; a pending signal
    /// stays pending.
    public static func install() {
        // sigaction only fails for invalid arguments; there is nothing useful to do about it.
        _ = simg_signals_install()
    }

    /// Ignores SIGPIPE and SIGXFSZ: a file size limit then fails the write with EFBIG (and a
    /// closed pipe with EPIPE), reported like any other write error, instead of killing simg
    /// half-way. Called once at startup by the executable only (ignored dispositions are
    /// inherited by child processes, so a library or test process should not set them).
    public static func ignoreWriteSignals() {
        _ = simg_signals_ignore_write_signals()
    }

    /// Throws `InterruptedError` naming `image` when a signal is pending.
    public static func check(image: String, outcome: String = "is incomplete") throws {
        let sig = simg_signals_pending()
        if sig != 0 { throw InterruptedError(signal: sig, image: image, outcome: outcome) }
    }

    /// The first SIGINT/SIGTERM received since `install()`, if any.
    public static var pendingSignal: Int32? {
        let sig = simg_signals_pending()
        return sig == 0 ? nil : sig
    }

    public static var isPending: Bool { simg_signals_pending() != 0 }

    /// Throws `InterruptedError` when a signal is pending. Cheap (one load): call it per request.
    public static func check() throws {
        let sig = simg_signals_pending()
        if sig != 0 { throw InterruptedError(signal: sig) }
    }

    /// Forgets a pending signal. For tests that raise a signal in their own process.
    public static func clearPending() {
        simg_signals_clear()
    }

    /// Dies of `signal` the Unix way (default disposition, re-raised), so that a parent shell
    /// sees death by SIGINT/SIGTERM and stops its own script too. Falls back to exit(128 + signal)
    /// should the signal not kill (e.g. it is ignored by a test harness's mask).
    public static func terminate(by signal: Int32) -> Never {
        simg_signals_reraise(signal)
        exit(128 + signal)
    }
}

/// SIGUSR1 as qemu-img's commands with a progress meter take it: without `-p`, the signal asks
/// for one progress line on stderr (printed at the meter's next step). The C handler only sets
/// a flag; `take()` reads and clears it.
public enum ProgressRequest {
    /// Installs the handler (the default disposition would kill the process).
    public static func install() {
        // sigaction only fails for invalid arguments; there is nothing useful to do about it.
        _ = simg_signals_install_progress()
    }

    /// Whether SIGUSR1 arrived since the last call.
    public static func take() -> Bool { simg_signals_take_progress_request() != 0 }

    /// Whether a request is waiting (left for `take()`).
    public static var isPending: Bool { simg_signals_progress_requested() != 0 }
}
