//! Whether a forward tracks gradients for its parameters: `without_grad` turns it off for the
//! calling thread, like PyTorch's `torch.no_grad()`.

use std::cell::Cell;

use candle_core::Tensor;

thread_local! {
    static WITHOUT_GRAD: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every parameter a constant, as in an evaluation forward, while training
/// forwards keep their training behaviour (batch statistics, power iteration): for a forward
/// whose result is never differentiated, such as the D step's fake batch. Like PyTorch's
/// `torch.no_grad()`, it holds for the calling thread until `f` returns.
pub fn without_grad<R>(f: impl FnOnce() -> R) -> R {
    super::backend::with_cell(&WITHOUT_GRAD, true, f)
}

/// A parameter as a forward uses it: itself when training, a constant otherwise (and inside
/// `without_grad`). Nothing is trained through an evaluation forward (the G step runs D in
/// evaluation mode), so gradients for its weights would be discarded work: whole GEMMs per
/// layer, and the graph's bookkeeping.
pub(crate) fn param(t: &Tensor, train: bool) -> Tensor {
    match train && !WITHOUT_GRAD.with(Cell::get) {
        true => t.clone(),
        false => t.detach(),
    }
}
