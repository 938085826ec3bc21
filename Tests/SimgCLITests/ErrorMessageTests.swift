import DiskIO
import Glibc
import ImageFormats
import Testing
@testable import SimgCLI

/// How library errors become qemu-img's sentences.
@Suite struct ErrorMessageTests {
    private let missing = IOError(code: ENOENT, operation: .open, path: "gone.qcow2")

    @Test func failedOpenOfTheImage() {
        #expect(CommandSupport.openFailure(IOError(code: ENOENT, operation: .open, path: "x"), path: "x", wording: .deepestImage)
                == "Could not open 'x': Could not open 'x': No such file or directory")
    }

    @Test func imageErrorAboutTheImage() {
        let error = ImageError(path: "x", message: "Unsupported qcow2 version 9")
        #expect(CommandSupport.openFailure(error, path: "x", wording: .deepestImage) == "Could not open 'x': Unsupported qcow2 version 9")
    }

    @Test func innermostFailureOfANestedChain() {
        let inner = ImageError(path: "mid.qcow2", message: "Could not open backing file 'gone.qcow2' of 'mid.qcow2'",
                               cause: missing)
        let outer = ImageError(path: "top.qcow2", message: "Could not open backing file 'mid.qcow2' of 'top.qcow2'",
                               cause: inner)
        #expect(CommandSupport.openFailure(outer, path: "top.qcow2", wording: .deepestImage)
                == "Could not open 'gone.qcow2': Could not open 'gone.qcow2': No such file or directory")
        let bad = ImageError(path: "gone.qcow2", message: "Image is not in qcow2 format")
        let nested = ImageError(path: "top.qcow2", message: "Could not open backing file 'gone.qcow2' of 'top.qcow2'",
                                cause: bad)
        #expect(CommandSupport.openFailure(nested, path: "top.qcow2", wording: .deepestImage) == "Could not open 'gone.qcow2': Image is not in qcow2 format")
    }

    @Test func readFailureNamesTheImage() {
        let read = IOError(code: EIO, operation: .read, path: "x", offset: 512)
        let error = ImageError(path: "x", message: "Could not read the header", cause: read)
        #expect(CommandSupport.openFailure(error, path: "x", wording: .deepestImage) == "Could not open 'x': Could not read the header: Could not read 'x' at offset 512: Input/output error")
        #expect(CommandSupport.openFailure(read, path: "x", wording: .deepestImage) == "Could not open 'x': Could not read 'x' at offset 512: Input/output error")
    }
}
