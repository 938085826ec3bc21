import ImageFormats

/// The top-level help and version texts.
public enum Help {
    public static let version = "0.1.0"

    public static var versionText: String {
        "simg version \(version)\nCommand line and output follow qemu-img 7.2\n"
    }

    public static var text: String {
        var text = "simg version \(version)\n"
        text += "usage: simg [-h | --help] [-V | --version] command [command options]\n"
        text += "Disk image utility for raw and qcow2 images (command line follows qemu-img 7.2)\n\n"
        text += "    '-h', '--help'       display this help and exit\n"
        text += "    '-V', '--version'    output version information and exit\n\n"
        text += "Command syntax:\n"
        for command in Commands.all { text += "  \(command.synopsis)\n" }
        text += """

            Command parameters:
              'filename' is a disk image filename
              'fmt' is the disk image format. It is guessed automatically in most cases
              'cache' is the cache mode used to write the output disk image, the valid
                options are: 'none', 'writeback' (default, except for convert), 'writethrough',
                'directsync' and 'unsafe' (default for convert)
              'src_cache' is the cache mode used to read input disk images, the valid
                options are the same as for the 'cache' option
              'output_filename' is the destination disk image filename
              'output_fmt' is the destination format
              '-c' indicates that target image must be compressed (qcow2 only)
              '-p' show progress of command (only certain commands)
              '--progress=json' (simg's own) progress as JSON lines on stderr, on the
                   commands that take '-p' (see README, Progress)
              '-S' indicates the consecutive number of bytes (defaults to 4k) that must
                   contain only zeros for simg to create a sparse image during
                   conversion. If the number of bytes is 0, the destination image will
                   always be fully allocated
              '-n' skips the target volume creation (useful if the volume is created
                   prior to running simg)
              'size' is the disk image size in bytes. Optional suffixes
                'k' or 'K' (kilobyte, 1024), 'M' (megabyte, 1024k), 'G' (gigabyte, 1024M),
                'T' (terabyte, 1024G), 'P' (petabyte, 1024T) and 'E' (exabyte, 1024P)  are
                supported. 'b' is ignored.
              'options' is a comma separated list of format specific options in a
                name=value format. Use -o help for an overview of the options supported by
                the used format
              '-u' allows unsafe backing chains: for image creation, create without
                   attempting to open the backing file.
                   For rebase: old and new backing file are assumed to match, only the header changes.
              '-h' with or without a command shows this help ('simg COMMAND --help' shows
                   that command's usage)
              '-q' use Quiet mode - do not print any output (except errors)
              '--output' takes the format in which the output must be done (human or json)
              '-U' (force share) is accepted for compatibility with qemu-img
              '-r' tries to repair any inconsistencies that are found during the check.
                   '-r leaks' repairs only cluster leaks, whereas '-r all' fixes all
                   kinds of errors, with a higher risk of choosing the wrong fix or
                   hiding corruption that has already occurred.

            Supported formats: \(ImageFormatNames.all)

            """
        return text
    }
}

enum ImageFormatNames {
    static var all: String { ImageFormat.allCases.map(\.rawValue).sorted().joined(separator: " ") }
}
