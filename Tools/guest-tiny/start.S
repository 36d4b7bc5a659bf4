/*
 * Multiboot (v1) entry for the Geminus tiny test guest.
 *
 * QEMU's -kernel loader (and GRUB) enter here in 32-bit protected mode with paging off,
 * interrupts off, EAX = 0x2BADB002 and EBX = physical address of the multiboot info.
 * The segment registers hold flat descriptors of the loader's GDT, which the spec says we
 * must not rely on, so we load our own before touching memory through them.
 */

        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000003       /* bit 0: page-align modules, bit 1: want mem_* info */

        .section .multiboot, "a"
        .align 4
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

        .section .bss
        .align 16
stack_bottom:
        .skip 16384
stack_top:

        .section .text
        .globl _start
        .type _start, @function
_start:
        cli
        cld
        mov     %eax, %esi              /* keep the loader's magic and info pointer */
        mov     %ebx, %edi

        lgdt    gdt_descriptor
        ljmp    $0x08, $1f
1:      mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %fs
        mov     %ax, %gs
        mov     %ax, %ss

        /* Zero .bss ourselves: a guest reset keeps RAM, so do not trust old contents. */
        mov     $__bss_start, %edx
        mov     $__bss_end, %ecx
        sub     %edx, %ecx
        push    %edi
        mov     %edx, %edi
        xor     %eax, %eax
        rep stosb
        pop     %edi

        mov     $stack_top, %esp
        pushl   $0
        popfl
        push    %edi                    /* multiboot info (physical = virtual) */
        push    %esi                    /* loader magic */
        call    guest_main
2:      cli
        hlt
        jmp     2b
        .size _start, . - _start

        .section .rodata
        .align 8
gdt:
        .quad 0x0000000000000000        /* null */
        .quad 0x00cf9a000000ffff        /* 0x08: code, base 0, limit 4 GiB, 32-bit */
        .quad 0x00cf92000000ffff        /* 0x10: data, base 0, limit 4 GiB */
gdt_end:
gdt_descriptor:
        .word gdt_end - gdt - 1
        .long gdt

        .section .note.GNU-stack, "", @progbits
