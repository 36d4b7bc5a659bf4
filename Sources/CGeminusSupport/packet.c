// Raw Ethernet on a host interface (AF_PACKET), for the agent's side of a guest NIC: the
// Swift Glibc module does not carry <netpacket/packet.h>.
#define _GNU_SOURCE
#include "geminus_support.h"
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <stdint.h>
#include <net/ethernet.h>
#include <net/if.h>
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
    // Frames the host's stack sent with checksum offload (a veth, a container, the host itself)
    // arrive here with their TCP/UDP checksum unfinished; the aux data says which, so the
    // receive below can finish it before the frame goes to a guest that checks it.
    int one = 1;
    if (setsockopt(fd, SOL_PACKET, PACKET_AUXDATA, &one, sizeof one) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

static uint32_t sum16(const uint8_t *p, size_t n, uint32_t sum) {
    for (size_t i = 0; i + 1 < n; i += 2) sum += (uint32_t)((p[i] << 8) | p[i + 1]);
    if (n & 1) sum += (uint32_t)(p[n - 1] << 8);
    return sum;
}

static uint16_t fold(uint32_t sum) {
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

int geminus_l4_checksum_fix(uint8_t *f, size_t n) {
    size_t l3 = 14;
    if (n < l3) return 0;
    uint16_t type = (uint16_t)((f[12] << 8) | f[13]);
    if (type == 0x8100 && n >= 18) { type = (uint16_t)((f[16] << 8) | f[17]); l3 = 18; }
    uint32_t sum = 0;
    size_t l4, l4len;
    uint8_t proto;
    if (type == 0x0800) {
        if (n < l3 + 20) return 0;
        size_t ihl = (size_t)(f[l3] & 0x0f) * 4;
        size_t total = (size_t)((f[l3 + 2] << 8) | f[l3 + 3]);
        uint16_t frag = (uint16_t)((f[l3 + 6] << 8) | f[l3 + 7]);
        if (ihl < 20 || total < ihl || l3 + total > n || (frag & 0x3fff) != 0) return 0;
        proto = f[l3 + 9];
        l4 = l3 + ihl;
        l4len = total - ihl;
        sum = sum16(f + l3 + 12, 8, 0);
    } else if (type == 0x86dd) {
        if (n < l3 + 40) return 0;
        size_t payload = (size_t)((f[l3 + 4] << 8) | f[l3 + 5]);
        if (l3 + 40 + payload > n) return 0;
        proto = f[l3 + 6];
        l4 = l3 + 40;
        l4len = payload;
        sum = sum16(f + l3 + 8, 32, 0);
    } else {
        return 0;
    }
    size_t at;
    if (proto == 6) at = 16;
    else if (proto == 17) at = 6;
    else return 0;
    if (l4len < at + 2) return 0;
    sum += proto;
    sum += (uint32_t)l4len;
    f[l4 + at] = 0;
    f[l4 + at + 1] = 0;
    uint16_t c = fold(sum16(f + l4, l4len, sum));
    if (proto == 17 && c == 0) c = 0xffff;
    f[l4 + at] = (uint8_t)(c >> 8);
    f[l4 + at + 1] = (uint8_t)c;
    return 1;
}

long geminus_packet_receive(int fd, void *buffer, size_t length, int *outgoing) {
    struct sockaddr_ll from;
    struct iovec iov = { .iov_base = buffer, .iov_len = length };
    union { struct cmsghdr align; char bytes[CMSG_SPACE(sizeof(struct tpacket_auxdata))]; } control;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_name = &from;
    msg.msg_namelen = sizeof from;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.bytes;
    msg.msg_controllen = sizeof control.bytes;
    ssize_t n = recvmsg(fd, &msg, MSG_DONTWAIT);
    if (n < 0) return -errno;
    *outgoing = from.sll_pkttype == PACKET_OUTGOING;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_PACKET || c->cmsg_type != PACKET_AUXDATA) continue;
        struct tpacket_auxdata aux;
        memcpy(&aux, CMSG_DATA(c), sizeof aux);
        if (aux.tp_status & TP_STATUS_CSUMNOTREADY) geminus_l4_checksum_fix(buffer, (size_t)n);
    }
    return (long)n;
}
