// Corosync's client libraries: cpg (group membership and agreed-order messages), quorum
// (quorate or not, from votequorum inside corosync) and cmap (the node list's names).
#include <corosync/corotypes.h>
#include <corosync/cpg.h>
#include <corosync/quorum.h>
#include <corosync/cmap.h>
