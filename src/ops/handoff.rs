//! Gradients handed from one custom op's backward straight to the previous one's, past candle's
//! gradient store.
//!
//! candle's backward gives every tensor that a gradient reaches a zeroed buffer of its size and
//! adds the gradient onto it (`GradStore::or_insert`, then `add`), on one thread: for a layer
//! stack's activations, and for the spectrally normalised weights (G's first is 6.4 MB on
//! sagan-mnist28), that is two extra passes over every one of them per step.
//!
//! Inside `run`, each op applied through `apply_op1` / `apply_op2` / `apply_op3` whose output
//! is tracked also gets a one-element *token*, a node of candle's graph whose operands are the
//! op's operands, each replaced by its token where an op of the run made it. The loss reaches
//! the stack's output through `bridge`, which continues the graph from the last token, so
//! candle walks the tokens and never the tensors they stand for: each token's backward takes
//! its output's gradient from a slot, runs the real op's backward, puts each operand's gradient
//! into its producer's slot and gives candle only the rest (a variable's, or an input's from
//! outside the run) and zeros for the tokens. The results are the same to the bit (candle's
//! sum is `0 + g`).
//!
//! A tensor made here must then be used only by ops applied here, or only after `bridge`: a
//! candle op on it would make its own graph reachable as well. Gradients stay right
//! (linearity: each path carries its own share), but the ops on that path would run their
//! backward twice. `LayerStack::run` bridges before every layer that uses candle ops.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, TensorId,
};

use super::cpu::storage::f32_slice;

/// Where a tracked op output's gradient is left for its op's backward.
#[derive(Default)]
struct Slot(Mutex<Option<Tensor>>);

impl Slot {
    /// Adds `grad` to what the slot holds: an output used by several ops gets the sum.
    fn put(&self, grad: Tensor) -> Result<()> {
        let mut held = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *held = Some(match held.take() {
            Some(sum) => (sum + grad)?,
            None => grad,
        });
        Ok(())
    }

    fn take(&self, op: &str) -> Result<Tensor> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "gradient hand-off: no gradient reached the output of {op}"
                ))
            })
    }
}

/// A tracked op output's token and its gradient slot.
#[derive(Clone)]
struct Link {
    token: Tensor,
    slot: Arc<Slot>,
}

thread_local! {
    /// The links of the running `run`, by output tensor; `None` outside one.
    static LINKS: RefCell<Option<HashMap<TensorId, Link>>> = const { RefCell::new(None) };
}

/// Runs `f` with hand-off on (`on`) or off for the ops it applies on this thread, restoring
/// the previous state after; links made while on are dropped then.
pub(crate) fn run<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<HashMap<TensorId, Link>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            LINKS.with(|links| *links.borrow_mut() = previous);
        }
    }
    let fresh = on.then(HashMap::new);
    let _restore = Restore(LINKS.with(|links| links.replace(fresh)));
    f()
}

/// The link of `x`, if the running hand-off made it.
fn link_of(x: &Tensor) -> Option<Link> {
    LINKS.with(|links| links.borrow().as_ref()?.get(&x.id()).cloned())
}

/// Makes the token for `y`, an op's tracked output computed from `operands` (its input first,
/// then its parameters), with `token_of(candle's operands, upstreams, slot)`: each operand
/// the running hand-off made is replaced by its token, its gradient bound for its slot.
/// Does nothing where hand-off is off.
fn link<const N: usize>(
    operands: [&Tensor; N],
    y: &Tensor,
    token_of: impl FnOnce([Tensor; N], [Upstream; N], Arc<Slot>) -> Result<Tensor>,
) -> Result<()> {
    if !y.track_op() || LINKS.with(|links| links.borrow().is_none()) {
        return Ok(());
    }
    let links = operands.map(link_of);
    let inputs: [Tensor; N] = std::array::from_fn(|i| match &links[i] {
        Some(link) => link.token.clone(),
        None => operands[i].clone(),
    });
    let upstreams = links.map(|link| match link {
        Some(link) => Upstream::Slot(link.slot),
        None => Upstream::Graph,
    });
    let slot = Arc::new(Slot::default());
    let token = token_of(inputs, upstreams, slot.clone())?;
    LINKS.with(|links| {
        if let Some(links) = links.borrow_mut().as_mut() {
            links.insert(y.id(), Link { token, slot });
        }
    });
    Ok(())
}

/// Where the gradient of one of an op's operands goes.
enum Upstream {
    /// To the producing op's slot; candle's operand is that op's token.
    Slot(Arc<Slot>),
    /// To candle: the operand is the tensor itself (a network's input, a variable, or a tensor
    /// from ops outside the hand-off).
    Graph,
}

impl Upstream {
    /// candle's gradient for its operand `operand`, given the operand's gradient `grad`.
    fn operand_grad(&self, operand: &Tensor, grad: Option<Tensor>) -> Result<Option<Tensor>> {
        match self {
            Upstream::Slot(slot) => {
                if let Some(grad) = grad {
                    slot.put(grad)?;
                }
                Ok(Some(operand.zeros_like()?))
            }
            Upstream::Graph => Ok(grad),
        }
    }
}

/// The one-element value of every token.
fn token_storage() -> (CpuStorage, Shape) {
    (CpuStorage::F32(vec![0.0]), Shape::from(1))
}

/// `x.apply_op1(op)`, with a token in the running hand-off.
pub(super) fn apply_op1<C: CustomOp1 + Send + Sync + 'static>(x: &Tensor, op: C) -> Result<Tensor> {
    let op: Arc<Box<dyn CustomOp1 + Send + Sync>> = Arc::new(Box::new(op));
    let y = x.apply_op1_arc(op.clone())?;
    link([x], &y, |[input], upstreams, slot| {
        input.apply_op1(Token::new(op, [x], &y, upstreams, slot))
    })?;
    Ok(y)
}

/// `x.apply_op2(a2, op)`, with a token in the running hand-off.
pub(super) fn apply_op2<C: CustomOp2 + Send + Sync + 'static>(
    x: &Tensor,
    a2: &Tensor,
    op: C,
) -> Result<Tensor> {
    let op: Arc<Box<dyn CustomOp2 + Send + Sync>> = Arc::new(Box::new(op));
    let y = x.apply_op2_arc(a2, op.clone())?;
    link([x, a2], &y, |[input, a2_input], upstreams, slot| {
        input.apply_op2(&a2_input, Token::new(op, [x, a2], &y, upstreams, slot))
    })?;
    Ok(y)
}

/// `x.apply_op3(a2, a3, op)`, with a token in the running hand-off.
pub(super) fn apply_op3<C: CustomOp3 + Send + Sync + 'static>(
    x: &Tensor,
    a2: &Tensor,
    a3: &Tensor,
    op: C,
) -> Result<Tensor> {
    let op: Arc<Box<dyn CustomOp3 + Send + Sync>> = Arc::new(Box::new(op));
    let y = x.apply_op3_arc(a2, a3, op.clone())?;
    link(
        [x, a2, a3],
        &y,
        |[input, a2_input, a3_input], upstreams, slot| {
            let token = Token::new(op, [x, a2, a3], &y, upstreams, slot);
            input.apply_op3(&a2_input, &a3_input, token)
        },
    )?;
    Ok(y)
}

/// `x` as a tensor for candle's own ops: where the running hand-off made `x`, a copy whose
/// gradient goes to `x`'s slot; otherwise `x` itself.
pub(crate) fn bridge(x: &Tensor) -> Result<Tensor> {
    match link_of(x) {
        Some(link) => link
            .token
            .apply_op2(&x.detach(), Bridge { slot: link.slot }),
        None => Ok(x.clone()),
    }
}

/// The token of `op`'s output `y = op(operands)`: candle's operands are the operands' tokens
/// (or the operands); its backward runs `op`'s on the real operands and `y`.
struct Token<Op: ?Sized, const N: usize> {
    op: Arc<Box<Op>>,
    operands: [Tensor; N],
    y: Tensor,
    upstreams: [Upstream; N],
    slot: Arc<Slot>,
}

impl<Op: ?Sized, const N: usize> Token<Op, N> {
    fn new(
        op: Arc<Box<Op>>,
        operands: [&Tensor; N],
        y: &Tensor,
        upstreams: [Upstream; N],
        slot: Arc<Slot>,
    ) -> Self {
        Self {
            op,
            operands: operands.map(Tensor::clone),
            y: y.clone(),
            upstreams,
            slot,
        }
    }
}

impl CustomOp1 for Token<dyn CustomOp1 + Send + Sync, 1> {
    fn name(&self) -> &'static str {
        "sagan-handoff-token1"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok(token_storage())
    }

    fn bwd(&self, operand: &Tensor, _token: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
        let dy = self.slot.take(self.op.name())?;
        let [x] = &self.operands;
        let dx = self.op.bwd(x, &self.y, &dy)?;
        self.upstreams[0].operand_grad(operand, dx)
    }
}

impl CustomOp2 for Token<dyn CustomOp2 + Send + Sync, 2> {
    fn name(&self) -> &'static str {
        "sagan-handoff-token2"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok(token_storage())
    }

    fn bwd(
        &self,
        o1: &Tensor,
        o2: &Tensor,
        _token: &Tensor,
        _grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = self.slot.take(self.op.name())?;
        let [x, a2] = &self.operands;
        let (dx, da2) = self.op.bwd(x, a2, &self.y, &dy)?;
        Ok((
            self.upstreams[0].operand_grad(o1, dx)?,
            self.upstreams[1].operand_grad(o2, da2)?,
        ))
    }
}

impl CustomOp3 for Token<dyn CustomOp3 + Send + Sync, 3> {
    fn name(&self) -> &'static str {
        "sagan-handoff-token3"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok(token_storage())
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        o1: &Tensor,
        o2: &Tensor,
        o3: &Tensor,
        _token: &Tensor,
        _grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = self.slot.take(self.op.name())?;
        let [x, a2, a3] = &self.operands;
        let (dx, da2, da3) = self.op.bwd(x, a2, a3, &self.y, &dy)?;
        Ok((
            self.upstreams[0].operand_grad(o1, dx)?,
            self.upstreams[1].operand_grad(o2, da2)?,
            self.upstreams[2].operand_grad(o3, da3)?,
        ))
    }
}

/// `(token, values)` to a copy of the values whose gradient goes to the token's slot.
struct Bridge {
    slot: Arc<Slot>,
}

impl CustomOp2 for Bridge {
    fn name(&self) -> &'static str {
        "sagan-handoff-bridge"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        values: &CpuStorage,
        layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let data = f32_slice(values, layout, layout.shape().elem_count())?;
        Ok((CpuStorage::F32(data.to_vec()), layout.shape().clone()))
    }

    fn bwd(
        &self,
        token: &Tensor,
        _values: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.slot.put(grad.clone())?;
        Ok((Some(token.zeros_like()?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::attention_core;
    use crate::ops::conv::{conv2d_bias_act, conv_transpose2d};
    use crate::ops::spectral_norm::normalized;
    use crate::ops::testing::{assert_close, input};
    use crate::ops::Activation;
    use candle_core::backprop::GradStore;
    use candle_core::{Device, Var};

    struct Net {
        x: Tensor,
        vars: Vec<Var>,
    }

    impl Net {
        fn new() -> Self {
            let var = |dims: &[usize], seed| {
                let t = input(1, 1, 1, dims.iter().product(), seed)
                    .reshape(dims)
                    .unwrap();
                Var::from_tensor(&(t * 0.2).unwrap()).unwrap()
            };
            Self {
                x: input(3, 4, 8, 8, 1),
                vars: vec![
                    var(&[16, 4, 4, 4], 2), // conv: 4 -> 16 channels, 8x8 -> 4x4
                    var(&[16], 3),
                    var(&[2 + 2 + 16, 16], 4), // attention: query, key, value rows
                    var(&[2 + 2 + 16], 5),
                    var(&[1], 6),           // gamma
                    var(&[16, 4, 4, 4], 7), // transposed conv back to 4 channels, 8x8
                ],
            }
        }

        /// conv (spectrally normalised weight) + leaky ReLU -> attention (with residual) ->
        /// transposed conv, and the intermediate tensors: the normalised weight and the two
        /// hidden activations. `candle_use` also feeds the first activation to a candle op.
        fn forward(&self, candle_use: bool) -> (Tensor, Vec<Tensor>) {
            let v: Vec<&Tensor> = self.vars.iter().map(|v| v.as_tensor()).collect();
            let u = Tensor::full(0.25f32, 16, &Device::Cpu).unwrap();
            let unit = Tensor::full(0.125f32, 64, &Device::Cpu).unwrap();
            let w0 = normalized(v[0], 0, &u, &unit).unwrap();
            let h1 = conv2d_bias_act(&self.x, &w0, v[1], 2, 1, Activation::LeakyRelu, 0.1).unwrap();
            let h2 = attention_core(&h1, v[2], v[3], Some(v[4]), 2, false).unwrap();
            let out = conv_transpose2d(&h2, v[5], 2, 1).unwrap();
            let mut out = bridge(&out).unwrap();
            if candle_use {
                let side = h1.sqr().unwrap().mean_all().unwrap();
                out = out.broadcast_add(&side).unwrap();
            }
            (out, vec![w0, h1, h2])
        }

        /// The gradients of a fixed weighting of the output, and which intermediate tensors
        /// candle's backward walks through.
        fn grads(&self, handoff: bool, candle_use: bool) -> (GradStore, Vec<bool>) {
            let (out, hidden) = run(handoff, || self.forward(candle_use));
            let loss = (out * input(3, 4, 8, 8, 9)).unwrap().sum_all().unwrap();
            let walked: Vec<TensorId> = loss.sorted_nodes().iter().map(|t| t.id()).collect();
            let walked = hidden.iter().map(|h| walked.contains(&h.id())).collect();
            (loss.backward().unwrap(), walked)
        }
    }

    fn assert_same(got: &GradStore, want: &GradStore, vars: &[Var], what: &str) {
        for (i, var) in vars.iter().enumerate() {
            let g = got
                .get(var)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let w = want
                .get(var)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(g, w, "{what}: gradient of parameter {i}");
        }
    }

    #[test]
    fn handed_off_gradients_are_candle_s_to_the_bit_without_activation_buffers() {
        let net = Net::new();
        let (want, walked) = net.grads(false, false);
        assert_eq!(
            walked,
            [true, true, true],
            "candle walks every intermediate tensor"
        );
        let (got, walked) = net.grads(true, false);
        assert_eq!(walked, [false, false, false], "handed off: none");
        assert_same(&got, &want, &net.vars, "hand-off");
    }

    #[test]
    fn an_activation_also_used_by_candle_ops_gets_both_shares() {
        let net = Net::new();
        let (want, _) = net.grads(false, true);
        let (got, walked) = net.grads(true, true);
        assert_eq!(
            walked,
            [true, true, false],
            "h1 through candle's op, and the weight behind it; h2 handed off"
        );
        for (i, var) in net.vars.iter().enumerate() {
            let (g, w) = (got.get(var).unwrap(), want.get(var).unwrap());
            assert_close(g, w, 1e-5, &format!("parameter {i}"));
        }
    }

    #[test]
    fn outside_a_run_ops_and_bridges_are_candle_s_own() {
        let net = Net::new();
        let (out, _) = net.forward(false);
        assert!(LINKS.with(|l| l.borrow().is_none()));
        let weights = input(3, 4, 8, 8, 9);
        let got = (out * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (want, _) = net.grads(false, false);
        assert_same(&got, &want, &net.vars, "no run");
    }
}
