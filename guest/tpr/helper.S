/*
 * skiff's guest-side TPR helper (seed 000): the code a patched TPR access calls
 * instead of touching the local APIC's task-priority register through MMIO.
 *
 * 32-bit protected-mode code, position-independent: skiff places it at the helper
 * page (src/tpr/mod.rs HELPER_GPA) and calls it from wherever the guest maps that
 * page, so it finds its data relative to its own address:
 *   page + 0x0000  this code (entry points at fixed 16-byte slots, below)
 *   page + 0x1000  the vAPIC slots, 16 bytes per vCPU, indexed by the vCPU's
 *                  index (`slot`, below, says how it is found); KVM_SET_VAPIC_ADDR points
 *                  each vCPU's vAPIC at its slot: byte 0 TPR (KVM takes it at every
 *                  exit), byte 1 the in-service class (ISR & 0xf0), byte 3 the
 *                  highest requested vector (KVM writes both before every entry)
 *   page + 0x2000  skiff's hypercall page (its `out` stub at offset 0)
 * Every entry preserves every register and flag except the one the replaced
 * instruction wrote. At 0xb0 a table of offsets (never executed) tells skiff where
 * the variants it chooses between at boot are (src/tpr/mod.rs, `Layout`). Built by
 * guest/tpr/build into helper.bin (checked in; skiff includes it, and a unit test
 * rebuilds it and compares).
 */
        .code32
        .text
        .set    HC_TPR_POLL, 0x5309
        .set    HC_TPR_READ, 0x530a

base:
/* 0x00: set TPR from the stack: `push VALUE; call` (replaces mov [TPR], reg and
   mov [TPR], imm32); pops the value on return. */
        .org    0x00
set_tpr:
        jmp     set_stack_body
/* 0x10: set TPR from EAX (replaces mov [TPR], eax). */
        .org    0x10
set_tpr_eax:
        jmp     set_eax_body
/* 0x20: `push eax; call`: the pushed slot becomes the TPR (replaces push [TPR]). */
        .org    0x20
get_tpr_stack:
        push    %eax
        call    read_tpr
        mov     %eax, 8(%esp)
        pop     %eax
        ret
/* 0x30 + 0x10 * r: TPR into register r (replaces mov reg, [TPR]); r = 4 (ESP)
   is never patched. */
        .org    0x30
get_tpr_eax:
        jmp     read_tpr
        .org    0x40
        push    %eax
        call    read_tpr
        mov     %eax, %ecx
        pop     %eax
        ret
        .org    0x50
        push    %eax
        call    read_tpr
        mov     %eax, %edx
        pop     %eax
        ret
        .org    0x60
        push    %eax
        call    read_tpr
        mov     %eax, %ebx
        pop     %eax
        ret
        .org    0x70
        ud2
        .org    0x80
        push    %eax
        call    read_tpr
        mov     %eax, %ebp
        pop     %eax
        ret
        .org    0x90
        push    %eax
        call    read_tpr
        mov     %eax, %esi
        pop     %eax
        ret
        .org    0xa0
        push    %eax
        call    read_tpr
        mov     %eax, %edi
        pop     %eax
        ret

/* 0xb0: where skiff selects a variant (16-bit offsets in this page): the `jmp`
   that starts `slot` and its two targets, the `jmp` after a TPR write and its two
   targets, then the `jmp` before a TPR read and its two targets. */
        .org    0xb0
layout:
        .word   slot - base
        .word   slot_one - base
        .word   slot_cpuid - base
        .word   after_write - base
        .word   poll_if_unmasked - base
        .word   poll - base
        .word   before_read - base
        .word   read_slot - base
        .word   read_poll - base

        .org    0xc8
/* EAX = this vCPU's TPR (zero-extended, as the register reads). Where KVM takes
   the slot's TPR late (see after_write), an access through a site not yet patched
   may have changed the APIC's TPR since the slot was written, with no report yet:
   skiff points this jump at `read_poll`, and the read asks skiff first, which
   copies the APIC's TPR into the slot. */
read_tpr:
        pushfl
        push    %ecx
        push    %edx
before_read:
        jmp     read_slot
read_poll:
        mov     $HC_TPR_READ, %eax
        call    hypercall
read_slot:
        call    slot
        movzbl  (%edx), %eax
        pop     %edx
        pop     %ecx
        popfl
        ret

set_stack_body:
        pushfl
        push    %eax
        push    %ecx
        push    %edx
        mov     20(%esp), %eax
        call    set_common
        pop     %edx
        pop     %ecx
        pop     %eax
        popfl
        ret     $4

set_eax_body:
        pushfl
        push    %eax
        push    %ecx
        push    %edx
        call    set_common
        pop     %edx
        pop     %ecx
        pop     %eax
        popfl
        ret

/* The new TPR in AL. Clobbers EAX, ECX, EDX (the callers keep them). */
set_common:
        push    %ebx
        mov     %eax, %ebx
        call    slot
        mov     %bl, (%edx)
/* KVM takes the slot's TPR when the vCPU next leaves the CPU. Where it does so
   after the write and before it injects anything (the host probe checks), only a
   lowering that unmasks a requested interrupt needs an exit at once (the poll). Where
   it does not (guest kernel mode emulated: the write and what follows run after
   KVM's read, and its own write of the slot can overwrite the TPR first), skiff
   points this jump at `poll`: every write is handed to skiff, which gives it to
   KVM at once. */
after_write:
        jmp     poll_if_unmasked
poll_if_unmasked:
        /* A requested interrupt whose class is above the new TPR's and the
           in-service one's is deliverable now, but KVM only takes the new TPR at
           the vCPU's next exit: make one. Raising the TPR needs none: KVM takes
           the byte before it injects anything. */
        movzbl  3(%edx), %eax
        and     $0xf0, %al
        and     $0xf0, %bl
        cmp     %bl, %al
        jbe     1f
        cmp     1(%edx), %al
        jbe     1f
poll:
        mov     $HC_TPR_POLL, %eax
        call    hypercall
1:      pop     %ebx
        ret

/* EDX = this vCPU's vAPIC slot. Clobbers EAX, ECX. Which vCPU runs this is
   shared code's question (a patched site calls the same helper on every vCPU), so
   the answer comes from the vCPU itself: CPUID leaf 1's initial APIC ID
   (EBX[31:24]), which skiff sets per vCPU to its index and the guest cannot
   change. KVM answers CPUID in the kernel (no exit to skiff; where guest kernel
   mode runs natively, one exit to KVM). `rdtscp` would be cheaper there but reads
   TSC_AUX, which guests rewrite (Linux puts its own CPU number there) and which
   KVM cannot emulate at CPL 0 where guest kernel mode is emulated. With one vCPU
   skiff points the jump at slot_one: slot 0, no CPUID. The index is one byte, so
   the slot stays inside the vAPIC page whatever CPUID says. CPUID also writes
   EDX, which is this routine's result anyway. */
slot:
        jmp     slot_cpuid
slot_cpuid:
        push    %ebx
        mov     $1, %eax
        cpuid
        shr     $24, %ebx
        mov     %ebx, %ecx
        pop     %ebx
        jmp     slot_at
slot_one:
        xor     %ecx, %ecx
slot_at:
        shl     $4, %ecx
        call    1f
1:      pop     %edx
        lea     (vapic - 1b)(%edx,%ecx), %edx
        ret

        .set    vapic, base + 0x1000
        .set    hypercall, base + 0x2000
