import FuzzHarness
import Glibc

/// libFuzzer's per-process setup. With SIMG_FUZZ_IN_FOLDER=1 (scripts/fuzz.sh sets it and passes
/// absolute paths) the private folder becomes the current directory, so an external data file
/// name in an input can reach the folder's `data.raw` (and nothing outside). Off by default:
/// relative corpus paths on the command line would no longer resolve.
@_cdecl("LLVMFuzzerInitialize")
public func fuzzInitialize(_ argc: UnsafeMutablePointer<Int32>,
                           _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>) -> Int32 {
    if let flag = getenv("SIMG_FUZZ_IN_FOLDER"), String(cString: flag) == "1" {
        FuzzHarness.enterPrivateFolder()
    }
    // The repairing check writes to the harness's copy of the input, in /dev/shm (memory):
    // a repair that would grow a file past 64 MiB fails with EFBIG instead of filling it.
    signal(SIGXFSZ, SIG_IGN)
    var limit = rlimit(rlim_cur: 64 << 20, rlim_max: 64 << 20)
    _ = setrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &limit)
    return 0
}

/// One input. Sound: libFuzzer passes `size` readable bytes at `data` (data may be any
/// pointer when size is 0, which UnsafeRawBufferPointer accepts).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    FuzzHarness.run(UnsafeRawBufferPointer(start: size > 0 ? data : nil, count: size))
    return 0
}
