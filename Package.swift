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

        .target(name: "DiskIO", dependencies: ["CLinuxShims", "CLibAIO"]),
        .target(name: "ImageFormats", dependencies: ["DiskIO", "CLinuxShims", "CZlib", "CZstd"]),
        // The aligned, merged copy pipeline behind convert (and rebase).
        .target(name: "Pipeline", dependencies: ["ImageFormats", "DiskIO"]),
        .target(name: "SimgCLI", dependencies: ["Pipeline", "ImageFormats", "DiskIO"]),
        .executableTarget(name: "simg", dependencies: ["SimgCLI"]),
        // What one fuzz input goes through (probe, open, info, block status, reads, check); shared by
        // the libFuzzer target in Fuzz/ (`make fuzz`) and the regression replay in `make test`.
        .target(name: "FuzzHarness", dependencies: ["ImageFormats", "DiskIO"]),

        .testTarget(name: "DiskIOTests", dependencies: ["DiskIO"]),
        .testTarget(name: "ImageFormatsTests", dependencies: ["ImageFormats", "DiskIO"]),
        .testTarget(name: "PipelineTests", dependencies: ["Pipeline", "ImageFormats", "DiskIO"]),
        .testTarget(name: "SimgCLITests", dependencies: ["SimgCLI", "ImageFormats"]),
        .testTarget(name: "InteropTests", dependencies: ["ImageFormats", "DiskIO"]),
        .testTarget(name: "FuzzHarnessTests", dependencies: ["FuzzHarness", "ImageFormats", "DiskIO"]),
    ]
)
