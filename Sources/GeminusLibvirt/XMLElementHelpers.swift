import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif

// Small XML helpers (elements without namespace, as libvirt writes them).

extension XMLElement {
    func child(_ name: String) -> XMLElement? {
        children?.first { $0.kind == .element && $0.name == name } as? XMLElement
    }

    func children(_ name: String) -> [XMLElement] {
        (children ?? []).compactMap { $0.kind == .element && $0.name == name ? $0 as? XMLElement : nil }
    }

    func attr(_ name: String) -> String? {
        attribute(forName: name)?.stringValue
    }

    func setAttr(_ name: String, _ value: String) {
        if let a = attribute(forName: name) {
            a.stringValue = value
        } else {
            addAttribute(XMLNode.attribute(withName: name, stringValue: value) as! XMLNode)
        }
    }

    var text: String {
        (stringValue ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
    }

    static func empty(_ name: String, _ attributes: KeyValuePairs<String, String>) -> XMLElement {
        let e = XMLElement(name: name)
        for (k, v) in attributes { e.setAttr(k, v) }
        return e
    }

    /// Appends `child` after the last element child, keeping the indentation of its siblings.
    func appendChild(_ child: XMLElement) {
        let kids = children ?? []
        if let last = kids.last(where: { $0.kind == .element }) {
            insert(child, after: last as? XMLElement)
        } else {
            addChild(child)
        }
    }

    /// Inserts `child` right after `sibling` (or first), copying the whitespace before the
    /// sibling so the result keeps the document's indentation.
    func insert(_ child: XMLElement, after sibling: XMLElement?) {
        guard let sibling, sibling.parent === self else {
            place([child], at: 0)
            return
        }
        let i = sibling.index
        let kids = children ?? []
        if i > 0, kids[i - 1].kind == .text, let ws = kids[i - 1].stringValue,
           ws.allSatisfy({ $0.isWhitespace }) {
            place([XMLNode.text(withStringValue: ws) as! XMLNode, child], at: i + 1)
        } else {
            place([child], at: i + 1)
        }
    }

    /// FoundationXML traps when inserting at the end of (or into) an empty child list: append there.
    private func place(_ nodes: [XMLNode], at index: Int) {
        if index >= childCount {
            for n in nodes { addChild(n) }
        } else {
            insertChildren(nodes, at: index)
        }
    }
}
