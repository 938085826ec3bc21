import DiskIO
import Glibc
import Testing

/// InterruptedError's wording. The handler itself is tested end to end in InteropTests
/// (SignalTests): raising SIGINT inside the shared test process would interrupt other suites'
/// in-process conversions.
@Suite("Interruption")
struct InterruptionTests {
    @Test func namesTheSignalAndTheImage() {
        #expect(InterruptedError(signal: SIGINT).description == "interrupted by SIGINT")
        #expect(InterruptedError(signal: SIGTERM, image: "out.qcow2").description
                == "interrupted by SIGTERM; 'out.qcow2' is incomplete")
        #expect(InterruptedError(signal: SIGINT, image: "a.raw", outcome: "was not created").description
                == "interrupted by SIGINT; 'a.raw' was not created")
        #expect(InterruptedError(signal: 99).signalName == "signal 99")
    }

    @Test func theInnermostNameWins() {
        let inner = InterruptedError(signal: SIGINT, image: "ov.qcow2", outcome: "was not rebased")
        #expect(inner.naming("other") == inner)
        #expect(InterruptedError(signal: SIGINT).naming("out.raw").image == "out.raw")
    }

    @Test func nothingPendingWithoutASignal() throws {
        // No test raises SIGINT/SIGTERM in this process, so nothing is pending.
        #expect(Interruption.pendingSignal == nil)
        #expect(!Interruption.isPending)
        try Interruption.check()
    }
}
