import DiskIO
import Glibc

/// `-r RATE` (bytes per second) for a copy: before each request of data, the copy sleeps until
/// the bytes already sent are due at the rate. So the first request goes at once and each
/// later one waits for the ones before it, as QEMU's ratelimit lets the first slice through
/// unthrottled (qemu-img convert -r takes about (data - one 2 MiB chunk) / rate). Zeros and
/// holes are not counted: only data read is paced.
struct RateLimiter {
    /// Bytes per second; 0 is unlimited.
    let rate: UInt64
    private var bytes: UInt64 = 0
    private var started: Double = 0

    init(rate: UInt64) { self.rate = rate }

    /// Waits until the bytes accounted so far are due. Sleeps in slices of at most 0.1 s so
    /// SIGINT/SIGTERM stop the copy promptly (the caller polls for them).
    mutating func wait() {
        guard rate > 0 else { return }
        if started == 0 { started = monotonicSeconds() }
        let due = Double(bytes) / Double(rate)
        while Interruption.pendingSignal == nil {
            let left = due - (monotonicSeconds() - started)
            if left <= 0 { break }
            usleep(UInt32(min(left, 0.1) * 1_000_000))
        }
    }

    /// `count` more bytes of data were sent.
    mutating func account(_ count: UInt64) {
        guard rate > 0 else { return }
        bytes += count
    }
}
