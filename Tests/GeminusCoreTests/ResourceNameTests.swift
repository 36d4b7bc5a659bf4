import Testing
import GeminusCore

/// Review finding L2: VM and domain names go into paths and QEMU options, so one rule, stated
/// in the error, decides which are accepted.
@Suite struct ResourceNameTests {
    @Test func ordinaryNamesPassAndHarmfulOnesAreRefusedWithTheRule() throws {
        for good in ["demo", "billing-1", "web_2.prod", "A", String(repeating: "x", count: ResourceName.maxBytes)] {
            #expect(ResourceName.problem(good) == nil, "\(good)")
        }
        for bad in ["", "a/b", "../etc", "x,y", ".hidden", "-rf", "sp ace", "tab\t", "dätabase", "semi;colon",
                    String(repeating: "x", count: ResourceName.maxBytes + 1), "new\nline"] {
            #expect(ResourceName.problem(bad) != nil, "\(bad) accepted")
        }
        let error = #expect(throws: GeminusError.self) { try ResourceName.validate("a/b", as: "--vm") }
        #expect(error?.code == .invalidArgument)
        #expect(error?.message.contains("--vm 'a/b'") == true && error?.message.contains("'/'") == true)
        #expect(error?.fix?.contains("A-Z a-z 0-9 . _ -") == true)
        let control = #expect(throws: GeminusError.self) { try ResourceName.validate("a\u{1b}[31m", as: "--vm") }
        #expect(control?.message.contains("\u{1b}") == false, "a control character reached the message")
    }
}
