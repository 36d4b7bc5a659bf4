import Foundation
import Testing
import GeminusCore
@testable import GeminusLibvirt

@Suite struct EnrollmentMetadataTests {
    @Test func elementRoundTrips() throws {
        let e = GeminusEnrollment(peer: "10.0.0.2:7400", intervalMilliseconds: 25, state: .protected)
        #expect(e.element == #"<enrollment version="1" peer="10.0.0.2:7400" interval-ms="25" state="protected"/>"#)
        #expect(try GeminusEnrollment(element: e.element) == e)
    }

    @Test func specialCharactersAreEscaped() throws {
        let e = GeminusEnrollment(peer: "[fe80::1%eth0]:7400 <&\"'>", intervalMilliseconds: 100, state: .failedOver)
        #expect(try GeminusEnrollment(element: e.element) == e)
    }

    @Test func readsWhatLibvirtReturnsAndUnknownStates() throws {
        // libvirt hands the element back with our prefix and namespace.
        let xml = #"<geminus:enrollment xmlns:geminus="https://geminus.dev/xmlns/ca/1" version="1" peer="b:1" interval-ms="40" state="from-the-future"/>"#
        let e = try GeminusEnrollment(element: xml)
        #expect(e == GeminusEnrollment(peer: "b:1", intervalMilliseconds: 40, state: .init(rawValue: "from-the-future")))
    }

    @Test func findsTheRecordInDomainXML() throws {
        let domain = """
        <domain type='qemu'><name>a</name>
          <metadata>
            <other:thing xmlns:other="https://example.com/x" state="nope"/>
            <geminus:enrollment xmlns:geminus="https://geminus.dev/xmlns/ca/1" version="1" peer="p:9" interval-ms="25" state="enrolled"/>
          </metadata>
        </domain>
        """
        #expect(try GeminusEnrollment.find(inDomainXML: domain) == GeminusEnrollment(peer: "p:9", intervalMilliseconds: 25, state: .enrolled))
        #expect(try GeminusEnrollment.find(inDomainXML: "<domain type='qemu'><name>a</name></domain>") == nil)
    }

    @Test func unusableRecordsSayHowToRemoveThem() {
        for bad in [#"<enrollment version="1" interval-ms="25" state="x"/>"#,
                    #"<enrollment version="1" peer="p" interval-ms="0" state="x"/>"#,
                    #"<enrollment version="2" peer="p" interval-ms="25" state="x"/>"#,
                    #"<enrolment peer="p" interval-ms="25" state="x"/>"#,
                    "<enrollment"] {
            do {
                _ = try GeminusEnrollment(element: bad)
                Issue.record("accepted \(bad)")
            } catch let e as GeminusError {
                #expect(e.code == .invalidArgument)
                #expect(e.fix?.contains("--remove --config") == true)
            } catch {
                Issue.record("unexpected error \(error)")
            }
        }
    }
}
