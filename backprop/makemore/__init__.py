"""The makemore "backprop ninja" notebook as a program, one concern per module, each importing
only the ones above it:

    data      the words, the vocabulary, the (context, next character) examples and their split
    model     parameters and init, the kernel chain (checked or unchecked kernels), its autograd
              twin, evaluation and sampling
    notebook  exercise 1 (the atomised forward and its backward by hand), exercises 2-3 and the
              gradient table of ``backprop check``
    step      one step type, the gradients, one update per optimizer and its state, the checks
    aot       the compiled step (built ahead of time on the CPU) and its disk cache
    train     exercise 4: validation, the training loop, and the compiled step's fallback
"""
