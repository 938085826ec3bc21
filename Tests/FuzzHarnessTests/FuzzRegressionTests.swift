import Testing
@testable import FuzzHarness

// Placeholder until the fuzz helper adds the regression replay: replace this file.
@Suite struct FuzzRegressionTests {
    @Test func emptyInputIsHarmless() {
        FuzzHarness.run(UnsafeRawBufferPointer(start: nil, count: 0))
        #expect(Bool(true))
    }
}
