import Testing
@testable import SimgCLI

@Suite struct OptionListTests {
    private func pairs(_ text: String) -> [String] {
        OptionList.parse(text).map { "\($0.name)=\($0.value)" }
    }

    @Test func namesAndValuesInOrder() {
        #expect(pairs("cluster_size=4k,lazy_refcounts=on") == ["cluster_size=4k", "lazy_refcounts=on"])
        #expect(pairs("b=2,a=1,b=3") == ["b=2", "a=1", "b=3"])
    }

    @Test func doubledCommaIsALiteralComma() {
        #expect(pairs("data_file=a,,b,compat=1.1") == ["data_file=a,b", "compat=1.1"])
        #expect(pairs("data_file=a,,,,b") == ["data_file=a,,b"])
        #expect(pairs("data_file=a,,") == ["data_file=a,"])
        #expect(pairs("data_file=a,,,compat=v3") == ["data_file=a,", "compat=v3"])
    }

    @Test func emptyValuesStayEmpty() {
        #expect(pairs("cluster_size=,compat=1.1") == ["cluster_size=", "compat=1.1"])
        #expect(pairs("a=") == ["a="])
        #expect(pairs("=5") == ["=5"])
    }

    @Test func bareNamesAreFlags() {
        #expect(pairs("lazy_refcounts") == ["lazy_refcounts=on"])
        #expect(pairs("nolazy_refcounts,extended_l2") == ["lazy_refcounts=off", "extended_l2=on"])
    }

    @Test func equalsInsideValues() {
        #expect(pairs("backing_file=a=b") == ["backing_file=a=b"])
    }

    @Test func helpRequests() {
        #expect(OptionList.wantsHelp("help"))
        #expect(OptionList.wantsHelp("?"))
        #expect(OptionList.wantsHelp("cluster_size=4k,help"))
        #expect(!OptionList.wantsHelp("help=1"))
        #expect(!OptionList.wantsHelp("data_file=help"))
        #expect(!OptionList.wantsHelp("data_file=x,,help"))
        #expect(!OptionList.wantsHelp("cluster_size=4k"))
    }

    @Test func validityAsQemuImgChecksIt() {
        #expect(OptionList.isValid("a=1"))
        #expect(OptionList.isValid("a=1,,"))
        #expect(!OptionList.isValid(""))
        #expect(!OptionList.isValid(",a=1"))
        #expect(!OptionList.isValid(",,"))
        #expect(!OptionList.isValid("a=1,"))
        #expect(!OptionList.isValid("a=1,,,"))
    }

    @Test func severalArgumentsJoin() throws {
        #expect(try OptionList.join([]) == nil)
        #expect(try OptionList.join(["a=1", "b=2,,x"]) == "a=1,b=2,,x")
        #expect(throws: CLIError("Invalid option list: a=1,")) { try OptionList.join(["b=2", "a=1,"]) }
        #expect(throws: CLIError("Invalid option list: ")) { try OptionList.join([""]) }
    }
}
