import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import GeminusCore

/// Parses XML strictly. FoundationXML on Linux recovers from malformed input (libxml2's
/// recover mode) and hands back a repaired document; so do XMLParser's return value and error.
/// A delegate that checks every end tag against its start tag catches what recovery hides.
func parseXMLStrictly(_ xml: String) throws -> XMLDocument {
    let data = Data(xml.utf8)
    let parser = XMLParser(data: data)
    let checker = WellFormednessChecker()
    parser.delegate = checker
    let ok = parser.parse()
    if let problem = checker.problem ?? (ok ? nil : parser.parserError.map { "\($0)" } ?? "malformed XML")
        ?? (checker.roots == 1 && checker.open.isEmpty ? nil : "unclosed or missing root element") {
        throw GeminusError(.invalidArgument, "the XML is not well-formed: \(problem)")
    }
    return try XMLDocument(data: data, options: [.nodePreserveWhitespace])
}

private final class WellFormednessChecker: NSObject, XMLParserDelegate {
    var open: [String] = []
    var roots = 0
    var problem: String?

    func parser(_ parser: XMLParser, didStartElement elementName: String, namespaceURI: String?,
                qualifiedName qName: String?, attributes attributeDict: [String: String] = [:]) {
        if open.isEmpty { roots += 1 }
        open.append(elementName)
    }

    func parser(_ parser: XMLParser, didEndElement elementName: String, namespaceURI: String?, qualifiedName qName: String?) {
        guard let last = open.popLast() else {
            problem = problem ?? "</\(elementName)> without a start tag"
            return
        }
        if last != elementName {
            problem = problem ?? "<\(last)> closed by </\(elementName)> (line \(parser.lineNumber))"
        }
    }

    func parser(_ parser: XMLParser, parseErrorOccurred parseError: any Error) {
        problem = problem ?? "\(parseError) at line \(parser.lineNumber)"
    }
}
