/*
 * skiff's guest-side TPR helper (seed 000): the code a patched TPR access calls
 * instead of touching the local APIC's task-priority register through MMIO.
 *
 * 32-bit protected-mode code, position-independent: skiff places it at the helper
 * page (src/tpr/mod.rs HELPER_GPA) and calls it from wherever the guest maps that
 * page, so it finds its data relative to its own address:
 *   page + 0x0000  this code (entry points at fixed 16-byte slots, below)
 *   page + 0x1000  the vAPIC slots, 16 bytes per vCPU, indexed by TSC_AUX (skiff
 *                  sets TSC_AUX to the vCPU's index); KVM_SET_VAPIC_ADDR points
 *                  each vCPU's vAPIC at its slot: byte 0 TPR (KVM takes it at every
 *                  exit), byte 1 the in-service class (ISR & 0xf0), byte 3 the
 *                  highest requested vector (KVM writes both before every entry)
 *   page + 0x2000  skiff's hypercall page (its `out` stub at offset 0)
 * Every entry preserves every register and flag except the one the replaced
 * instruction wrote. Built by guest/tpr/build into helper.bin (checked in; skiff
 * includes it, and a unit test rebuilds it and compares).
 */
        .code32
        .text
        .set    HC_TPR_POLL, 0x5309

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

        .org    0xb0
/* EAX = this vCPU's TPR (zero-extended, as the register reads). */
read_tpr:
        pushfl
        push    %ecx
        push    %edx
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
        /* A requested interrupt whose class is above the new TPR's and the
           in-service one's is deliverable now, but KVM only takes the new TPR at
           the vCPU's next exit: make one (the poll call). Raising the TPR needs
           none: KVM takes the byte before it injects anything. */
        movzbl  3(%edx), %eax
        and     $0xf0, %al
        and     $0xf0, %bl
        cmp     %bl, %al
        jbe     1f
        cmp     1(%edx), %al
        jbe     1f
        mov     $HC_TPR_POLL, %eax
        call    hypercall
1:      pop     %ebx
        ret

/* EDX = this vCPU's vAPIC slot. Clobbers EAX, ECX. The index is one byte, so the
   slot stays inside the vAPIC page whatever the guest put in TSC_AUX. */
slot:
        rdtscp
        movzbl  %cl, %ecx
        shl     $4, %ecx
        call    1f
1:      pop     %edx
        lea     (vapic - 1b)(%edx,%ecx), %edx
        ret

        .set    vapic, base + 0x1000
        .set    hypercall, base + 0x2000
