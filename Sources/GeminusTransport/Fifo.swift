/// A first-in first-out queue with O(1) amortised push and pop; `Array.removeFirst` is O(n),
/// and a 64 MiB queue of small frames holds a million entries.
struct Fifo<Element> {
    private var storage: [Element] = []
    private var head = 0

    var isEmpty: Bool { head == storage.count }
    var count: Int { storage.count - head }
    var first: Element? { isEmpty ? nil : storage[head] }

    mutating func push(_ e: Element) { storage.append(e) }

    mutating func pop() -> Element? {
        guard !isEmpty else { return nil }
        let e = storage[head]
        head += 1
        if head == storage.count {
            storage.removeAll(keepingCapacity: true)
            head = 0
        } else if head >= 1024 && head * 2 >= storage.count {
            storage.removeFirst(head)
            head = 0
        }
        return e
    }

    mutating func removeAll() {
        storage.removeAll()
        head = 0
    }
}
