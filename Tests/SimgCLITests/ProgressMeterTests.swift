import Testing
@testable import SimgCLI

/// util/qemu-progress.c's rule and printf's `%3.2f`, which qemu-img's meter lines come from.
@Suite("Progress meter") struct ProgressMeterTests {
    @Test("glibc %3.2f: the binary value rounded, exact ties to even")
    func rounding() {
        #expect(QemuProgressMeter.format(3.125) == "3.12")
        #expect(QemuProgressMeter.format(9.375) == "9.38")
        #expect(QemuProgressMeter.format(Float(100.0 * 5 / 9)) == "55.56")
        #expect(QemuProgressMeter.format(0) == "0.00")
        #expect(QemuProgressMeter.format(100) == "100.00")
        #expect(QemuProgressMeter.line(12.5) == "    (12.50/100%)\r")
    }

    @Test("printed when moved by more than the step, or at exactly 0 or 100")
    func minimumStep() {
        var meter = QemuProgressMeter(minSkip: 2)
        #expect(meter.advance(0, max: 100) == "    (0.00/100%)\r")
        #expect(meter.advance(0, max: 100) == "    (0.00/100%)\r")
        #expect(meter.advance(2, max: 0) == nil)          // not more than 2 points
        #expect(meter.advance(2.5, max: 0) == "    (2.50/100%)\r")
        #expect(meter.advance(1, max: 100) == nil)        // relative: 3.50
        #expect(meter.advance(1, max: 100) == nil)        // 4.50: exactly 2 points is not more
        #expect(meter.advance(0.5, max: 100) == "    (5.00/100%)\r")
        #expect(meter.advance(1, max: 0) == "    (1.00/100%)\r")  // more than 2 points back
        #expect(meter.advance(150, max: 0) == "    (100.00/100%)\r")
        #expect(meter.current == 100)
        #expect(meter.advance(100, max: 0) == "    (100.00/100%)\r")
    }
}
