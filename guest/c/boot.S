/*
 * castor-guest: boot path.
 *
 * Entered in 32-bit protected mode with paging off, as multiboot v1 defines:
 *   BSP: EAX = 0x2BADB002, EBX = physical address of the multiboot info.
 *   AP (castor extension): EAX = 0x43535452 ('CSTR'), EBX = the vCPU index.
 * QEMU's `-kernel` starts only the BSP; castor starts every vCPU at the entry.
 *
 * The BSP builds identity page tables (2 MiB pages, 0-4 GiB, user-accessible),
 * every CPU then enables long mode and calls kmain(magic, arg, cpu) on its own
 * stack. Everything here is ring 0 and runs through KVM's emulator on kvm_pvm,
 * so it is kept short; the workloads run in ring 3.
 */
#define MB_MAGIC        0x1BADB002
#define MB_FLAGS        0x00000003
#define CASTOR_AP_MAGIC 0x43535452
#define MAX_CPUS        16
#define STACK_SHIFT     14

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .section .text.boot, "ax"
    .code32
    .global _start
_start:
    cli
    cld
    mov     %eax, %edi              /* magic */
    mov     %ebx, %esi              /* multiboot info, or AP index */
    xor     %ebp, %ebp              /* cpu index */
    cmp     $CASTOR_AP_MAGIC, %eax
    jne     1f
    mov     %ebx, %ebp
1:  cmp     $MAX_CPUS, %ebp
    jae     halt32
    /* stack top = boot_stacks + (cpu + 1) << STACK_SHIFT */
    mov     %ebp, %eax
    inc     %eax
    shl     $STACK_SHIFT, %eax
    add     $boot_stacks, %eax
    mov     %eax, %esp

    lgdt    gdt_ptr
    mov     $0x10, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    mov     %ax, %fs
    mov     %ax, %gs

    test    %ebp, %ebp
    jnz     2f
    /* BSP: pml4[0] -> pdpt; pdpt[0..3] -> pd[0..3]; pd: 2048 x 2 MiB pages */
    mov     $pdpt, %eax
    or      $7, %eax
    mov     %eax, pml4
    movl    $0, pml4 + 4
    xor     %ecx, %ecx
3:  mov     %ecx, %eax
    shl     $12, %eax
    add     $pd, %eax
    or      $7, %eax
    mov     %eax, pdpt(, %ecx, 8)
    movl    $0, pdpt + 4(, %ecx, 8)
    inc     %ecx
    cmp     $4, %ecx
    jb      3b
    xor     %ecx, %ecx
4:  mov     %ecx, %eax
    shl     $21, %eax
    or      $0x87, %eax             /* present, writable, user, 2 MiB */
    mov     %eax, pd(, %ecx, 8)
    movl    $0, pd + 4(, %ecx, 8)
    inc     %ecx
    cmp     $2048, %ecx
    jb      4b
    movl    $1, tables_ready
    jmp     5f
2:  pause                           /* AP: wait for the BSP's page tables */
    cmpl    $1, tables_ready
    jne     2b
5:
    mov     $pml4, %eax
    mov     %eax, %cr3
    mov     %cr4, %eax
    or      $0x20, %eax             /* PAE */
    mov     %eax, %cr4
    mov     $0xC0000080, %ecx       /* EFER */
    rdmsr
    or      $0x101, %eax            /* LME | SCE */
    wrmsr
    mov     %cr0, %eax
    or      $0x80010001, %eax       /* PG | WP | PE */
    mov     %eax, %cr0
    ljmp    $0x08, $long_entry

halt32:
    cli
    hlt
    jmp     halt32

    .code64
long_entry:
    mov     $0x10, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    xor     %ax, %ax
    mov     %ax, %fs
    mov     %ax, %gs
    mov     %esp, %esp              /* zero-extend */
    mov     %edi, %edi
    mov     %esi, %esi
    mov     %ebp, %edx
    call    kmain
    .global halt_forever
halt_forever:
    cli
    hlt
    jmp     halt_forever

/* ---- interrupt and exception entry ---- */
    .macro EXC_NOERR n
    .global exc_\n
exc_\n:
    pushq   $0
    pushq   $\n
    jmp     exc_common
    .endm
    .macro EXC_ERR n
    .global exc_\n
exc_\n:
    pushq   $\n
    jmp     exc_common
    .endm

    EXC_NOERR 0
    EXC_NOERR 1
    EXC_NOERR 2
    EXC_NOERR 3
    EXC_NOERR 4
    EXC_NOERR 5
    EXC_NOERR 6
    EXC_NOERR 7
    EXC_ERR   8
    EXC_NOERR 9
    EXC_ERR   10
    EXC_ERR   11
    EXC_ERR   12
    EXC_ERR   13
    EXC_ERR   14
    EXC_NOERR 15
    EXC_NOERR 16
    EXC_ERR   17
    EXC_NOERR 18
    EXC_NOERR 19

exc_common:
    /* stack: vector, error code, rip, cs, rflags, rsp, ss */
    mov     %rsp, %rdi
    and     $-16, %rsp
    call    exception_handler       /* does not return */
    jmp     halt_forever

    /* Timer interrupt (ring 0 -> ring 0): save the caller-saved registers. */
    .global timer_entry
timer_entry:
    push    %rax
    push    %rbx
    push    %rcx
    push    %rdx
    push    %rsi
    push    %rdi
    push    %r8
    push    %r9
    push    %r10
    push    %r11
    mov     %rsp, %rbx              /* callee-saved across the C call */
    and     $-16, %rsp
    call    timer_tick
    mov     %rbx, %rsp
    pop     %r11
    pop     %r10
    pop     %r9
    pop     %r8
    pop     %rdi
    pop     %rsi
    pop     %rdx
    pop     %rcx
    pop     %rbx
    pop     %rax
    iretq

    .global spurious_entry
spurious_entry:
    iretq

/* ---- data ---- */
    .section .data
    .align 16
    .global gdt
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF        /* 0x08 kernel code, 64-bit */
    .quad 0x00CF92000000FFFF        /* 0x10 kernel data */
    .quad 0x00CFFA000000FFFF        /* 0x18 user code, 32-bit (SYSRET base) */
    .quad 0x00CFF2000000FFFF        /* 0x20 user data */
    .quad 0x00AFFA000000FFFF        /* 0x28 user code, 64-bit */
    .global gdt_tss
gdt_tss:
    .fill MAX_CPUS * 2, 8, 0        /* 0x30 + 16 * cpu: one TSS descriptor per CPU */
gdt_end:
    .global gdt_ptr
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
    .long 0

    .align 4
tables_ready:
    .long 0

    .section .bss
    .align 4096
    .global pml4
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4 * 4096
    .align 16
    .global boot_stacks
boot_stacks:
    .skip MAX_CPUS << STACK_SHIFT
