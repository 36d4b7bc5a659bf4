// Raw Ethernet on a host interface (AF_PACKET), for the agent's side of a guest NIC: the
// Swift Glibc module does not carry <netpacket/packet.h>.
#define _GNU_SOURCE
#include "geminus_support.h"
#include <arpa/inet.h>
#include <errno.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netpacket/packet.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int geminus_packet_open(const char *ifname) {
    unsigned int index = if_nametoindex(ifname);
    if (index == 0) return -errno;
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ALL));
    if (fd < 0) return -errno;
    struct sockaddr_ll addr;
    memset(&addr, 0, sizeof addr);
    addr.sll_family = AF_PACKET;
    addr.sll_protocol = htons(ETH_P_ALL);
    addr.sll_ifindex = (int)index;
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    // The guest's MAC is not the interface's: without promiscuous mode a real NIC filters its
    // frames away (a veth does not, but the rule is the same).
    struct packet_mreq mr;
    memset(&mr, 0, sizeof mr);
    mr.mr_ifindex = (int)index;
    mr.mr_type = PACKET_MR_PROMISC;
    if (setsockopt(fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mr, sizeof mr) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

long geminus_packet_receive(int fd, void *buffer, size_t length, int *outgoing) {
    struct sockaddr_ll from;
    socklen_t fromlen = sizeof from;
    ssize_t n = recvfrom(fd, buffer, length, MSG_DONTWAIT, (struct sockaddr *)&from, &fromlen);
    if (n < 0) return -errno;
    *outgoing = from.sll_pkttype == PACKET_OUTGOING;
    return (long)n;
}
