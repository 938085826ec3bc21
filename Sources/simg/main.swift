import SimgCLI

SimgCLI.main()
