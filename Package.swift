// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "simg",
    products: [
        .executable(name: "simg", targets: ["simg"]),
        // For the fuzzer package in Fuzz/, which builds the same harness with -sanitize=fuzzer.
        .library(name: "FuzzHarness", targets: ["FuzzHarness"]),
    ],
    targets: [
        // C shims for what Swift cannot see directly: O_DIRECT and friends need _GNU_SOURCE.
        .target(name: "CLinuxShims"),
        .systemLibrary(name: "CLibAIO", providers: [.apt(["libaio-dev"])]),
        .systemLibrary(name: "CZlib", providers: [.apt(["zlib1g-dev"])]),
        .systemLibrary(name: "CZstd", providers: [.apt(["libzstd-dev"])]),
        // libdeflate: raw deflate for qcow2 clusters, much faster than zlib both ways (zlib stays
        // for the streams libdeflate refuses).
        .systemLibrary(name: "CDeflate", providers: [.apt(["libdeflate-dev"])]),

        .target(name: "DiskIO", dependencies: ["CLinuxShims", "CLibAIO"]),
        .target(name: "ImageFormats", dependencies: ["DiskIO", "CLinuxShims", "CZlib", "CZstd", "CDeflate"]),
        // The aligned, merged copy pipeline behind convert (and rebase).
        .target(name: "Pipeline", dependencies: ["ImageFormats", "DiskIO"]),
        .target(name: "SimgCLI", dependencies: ["Pipeline", "ImageFormats", "DiskIO"]),
        .executableTarget(name: "simg", dependencies: ["SimgCLI"]),
        // What one fuzz input goes through (probe, open, info, block status, reads, check); shared by
        // the libFuzzer target in Fuzz/ (`make fuzz`) and the regression replay in `make test`.
        .target(name: "FuzzHarness", dependencies: ["ImageFormats", "DiskIO"]),

        // Helpers the test targets share (temporary folders, program runners, a fake image, ...).
        // Only test targets depend on it, so nothing of it reaches the simg executable.
        // Built optimized even in debug builds: its pattern generators and editors make tens of
        // MiB per test, which unoptimized generic code turns into minutes of the suite.
        .target(name: "TestSupport", dependencies: ["ImageFormats", "DiskIO"], path: "Tests/TestSupport",
                swiftSettings: [.unsafeFlags(["-O"])]),

        .testTarget(name: "DiskIOTests", dependencies: ["DiskIO", "TestSupport"]),
        .testTarget(name: "ImageFormatsTests", dependencies: ["ImageFormats", "DiskIO", "TestSupport"]),
        .testTarget(name: "PipelineTests", dependencies: ["Pipeline", "ImageFormats", "DiskIO", "TestSupport"]),
        .testTarget(name: "SimgCLITests", dependencies: ["SimgCLI", "ImageFormats", "TestSupport"]),
        // CZlib: the deflate tests make a stream QEMU's writer never makes (no final block).
        .testTarget(name: "InteropTests", dependencies: ["ImageFormats", "DiskIO", "TestSupport", "CZlib"]),
        .testTarget(name: "FuzzHarnessTests", dependencies: ["FuzzHarness", "ImageFormats", "DiskIO", "TestSupport"]),
    ]
)
