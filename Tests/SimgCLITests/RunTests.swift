import Testing
@testable import SimgCLI

/// Runs simg in-process and captures what it prints.
private func simg(_ arguments: String...) -> (status: Int32, out: String, err: String) { runInProcess(arguments) }

private let tryHelp = "Try 'simg --help' for more information\n"

@Suite struct RunTests {
    @Test func versionAndHelp() {
        for flag in ["-V", "--version", "--vers"] {
            let r = simg(flag)
            #expect(r.status == 0)
            #expect(r.out == "simg version 0.1.0\nCommand line and output follow qemu-img 7.2\n")
        }
        for flag in ["-h", "--help"] {
            let r = simg(flag)
            #expect(r.status == 0)
            #expect(r.out.contains("usage: simg [-h | --help] [-V | --version] command [command options]\n"))
            #expect(r.out.contains("\n  create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]\n"))
            #expect(r.out.contains("\n  info [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename\n"))
            #expect(r.out.contains("Supported formats: qcow2 raw\n"))
            #expect(r.err.isEmpty)
        }
    }

    @Test func commandHelp() {
        for arguments in [["info", "--help"], ["info", "-h"], ["info", "x", "--he", "-z"], ["create", "-qh"]] {
            let r = runInProcess(arguments)
            #expect(r.status == 0)
            // The synopses start as qemu-img's, with --object (and info's --image-opts).
            let start = arguments[0] == "info" ? "info [--object objectdef] [--image-opts]" : "create [--object objectdef]"
            #expect(r.out.hasPrefix("usage: simg \(start) [-q] [-f fmt]"))
            #expect(r.err.isEmpty)
        }
    }

    @Test func globalErrors() {
        #expect(simg() == (1, "", "simg: Not enough arguments\n" + tryHelp))
        #expect(simg("foo") == (1, "", "simg: Command not found: foo\n" + tryHelp))
        #expect(simg("-z") == (1, "", "simg: unrecognized option '-z'\n" + tryHelp))
        #expect(simg("--zz", "info") == (1, "", "simg: unrecognized option '--zz'\n" + tryHelp))
        // Options before the command are global ones only.
        #expect(simg("-q", "info", "x") == (1, "", "simg: unrecognized option '-q'\n" + tryHelp))
    }

    @Test func infoUsageErrors() {
        #expect(simg("info") == (1, "", "simg: Expecting one image file name\n" + tryHelp))
        #expect(simg("info", "a", "b") == (1, "", "simg: Expecting one image file name\n" + tryHelp))
        #expect(simg("info", "-z", "x") == (1, "", "simg: unrecognized option '-z'\n" + tryHelp))
        #expect(simg("info", "--zz", "x") == (1, "", "simg: unrecognized option '--zz'\n" + tryHelp))
        #expect(simg("info", "x", "-f") == (1, "", "simg: missing argument for option '-f'\n" + tryHelp))
        #expect(simg("info", "x", "--output") == (1, "", "simg: missing argument for option '--output'\n" + tryHelp))
        #expect(simg("info", "--output=xml", "x")
                == (1, "", "simg: --output must be used with human or json as argument.\n"))
        #expect(simg("info", "-f", "foo", "x") == (1, "", "simg: Could not open 'x': Unknown driver 'foo'\n"))
    }

    @Test func createUsageErrors() {
        #expect(simg("create") == (1, "", "simg: Expecting image file name\n" + tryHelp))
        #expect(simg("create", "-f") == (1, "", "simg: missing argument for option '-f'\n" + tryHelp))
        #expect(simg("create", "-o", "", "x", "1M") == (1, "", "simg: Invalid option list: \n"))
        #expect(simg("create", "-o", ",,", "x", "1M") == (1, "", "simg: Invalid option list: ,,\n"))
        #expect(simg("create", "-f", "foo", "-o", "help") == (1, "", "simg: Unknown file format 'foo'\n"))
    }
}
