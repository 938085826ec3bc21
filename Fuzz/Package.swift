// swift-tools-version:6.0
import PackageDescription

// The libFuzzer executable for simg's read path. A package of its own so the main build stays
// plain: build it with `swift build --package-path Fuzz -c release --sanitize=fuzzer`, which
// instruments this package and its dependencies (ImageFormats, DiskIO) for coverage.
// scripts/fuzz.sh (`make fuzz`) builds and runs it.
let package = Package(
    name: "simg-fuzz",
    dependencies: [
        .package(name: "simg", path: ".."),
    ],
    targets: [
        .executableTarget(
            name: "simg-fuzz",
            dependencies: [.product(name: "FuzzHarness", package: "simg")],
            // libFuzzer supplies main(); this target only defines LLVMFuzzerTestOneInput.
            swiftSettings: [.unsafeFlags(["-parse-as-library"])]
        ),
    ]
)
