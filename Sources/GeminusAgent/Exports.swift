// The nodes and their seams are part of what the agent offers its callers.
@_exported import GeminusNode
