//! The numeric kernels of the forward pass: a checked GEMM over strided views, layer
//! norm, GELU, softmax. Plain loops over slices that the compiler vectorises; the
//! matrix products go to the `gemm` crate (AVX2/AVX-512 kernels picked at run time).
//! Parallelism comes from running chunks of a batch on the pool's threads, which
//! needs no synchronisation inside a layer; a call of fewer sentences than threads
//! splits the columns of each product with the weights instead
//! ([`matmul_columns`]).

/// A read-only matrix view: element (i, j) is at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A dense row-major matrix.
    pub fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, without copying.
    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn last_index(&self) -> usize {
        (self.rows.max(1) - 1) * self.rs + (self.cols.max(1) - 1) * self.cs
    }
}

/// A mutable matrix view, laid out like [`View`].
pub(crate) struct ViewMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> ViewMut<'a> {
    /// A dense row-major matrix.
    pub fn dense(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        ViewMut {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
}

/// `dst = lhs · rhs`, or `dst += lhs · rhs` when `accumulate`.
///
/// Panics if the shapes disagree or a view reaches past its slice, so the unsafe
/// call below only ever sees in-bounds, non-aliasing memory (`dst` is `&mut`).
pub(crate) fn matmul(dst: ViewMut<'_>, lhs: View<'_>, rhs: View<'_>, accumulate: bool) {
    assert_eq!(lhs.cols, rhs.rows, "inner dimensions");
    assert_eq!((dst.rows, dst.cols), (lhs.rows, rhs.cols), "output shape");
    if dst.rows == 0 || dst.cols == 0 {
        return;
    }
    if lhs.cols == 0 {
        if !accumulate {
            for i in 0..dst.rows {
                for j in 0..dst.cols {
                    dst.data[i * dst.rs + j * dst.cs] = 0.0;
                }
            }
        }
        return;
    }
    assert!(lhs.last_index() < lhs.data.len(), "lhs out of bounds");
    assert!(rhs.last_index() < rhs.data.len(), "rhs out of bounds");
    let last = (dst.rows - 1) * dst.rs + (dst.cols - 1) * dst.cs;
    assert!(last < dst.data.len(), "dst out of bounds");
    #[allow(unsafe_code)]
    // SAFETY: every index the product touches is in bounds (checked above), `dst` is an
    // exclusive borrow so it cannot alias the inputs, and the strides fit in isize
    // because they index slices that exist.
    unsafe {
        product(
            dst.data.as_mut_ptr(),
            dst.rows,
            dst.cols,
            dst.rs,
            dst.cs,
            lhs,
            rhs,
            accumulate,
        )
    }
}

/// The GEMM call itself, into `rows × cols` elements at `dst` with strides `rs`, `cs`.
///
/// # Safety
/// Every element of that view is valid for writes, no other thread touches it while
/// this runs, and it does not overlap `lhs` or `rhs`, whose shapes agree with it and
/// lie within their slices (with `lhs.cols > 0`).
#[allow(unsafe_code, clippy::too_many_arguments)]
unsafe fn product(
    dst: *mut f32,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
    lhs: View<'_>,
    rhs: View<'_>,
    accumulate: bool,
) {
    // SAFETY: the caller's promise.
    unsafe {
        gemm::gemm(
            rows,
            cols,
            lhs.cols,
            dst,
            cs as isize,
            rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Work below this many multiply-adds is not worth a second thread (starting one
/// costs about 50 µs here, some 2.5 M multiply-adds).
const PARALLEL_MACS: usize = 4 << 20;

/// `dst (+)= lhs · rhs` as [`matmul`] does, on up to `threads` threads, each
/// computing a contiguous range of `dst`'s columns from all rows.
///
/// Columns, not rows: each thread then reads only its share of `rhs` (a weight
/// matrix, too big for the caches), where splitting rows would have every thread
/// stream all of it. With one sentence on two threads, rows measured 1.07× one
/// thread and columns 1.36× (69 × 384 × 1,536, 24 weight matrices in turn).
pub(crate) fn matmul_columns(
    dst: ViewMut<'_>,
    lhs: View<'_>,
    rhs: View<'_>,
    accumulate: bool,
    threads: usize,
) {
    let macs = dst.rows * dst.cols * lhs.cols;
    let parts = threads.min(dst.cols / 16).min(macs / PARALLEL_MACS).max(1);
    if parts == 1 {
        return matmul(dst, lhs, rhs, accumulate);
    }
    assert_eq!(lhs.cols, rhs.rows, "inner dimensions");
    assert_eq!((dst.rows, dst.cols), (lhs.rows, rhs.cols), "output shape");
    let last = (dst.rows - 1) * dst.rs + (dst.cols - 1) * dst.cs;
    assert!(last < dst.data.len(), "dst out of bounds");
    // Column ranges on 16-column boundaries (one AVX-512 register of f32).
    let cut = |i: usize| (dst.cols * i / parts) / 16 * 16;
    let cuts: Vec<(usize, usize)> = (0..parts)
        .map(|i| (cut(i), if i + 1 == parts { dst.cols } else { cut(i + 1) }))
        .collect();
    assert!(lhs.last_index() < lhs.data.len(), "lhs out of bounds");
    assert!(rhs.last_index() < rhs.data.len(), "rhs out of bounds");
    let out = Shared(dst.data.as_mut_ptr());
    let (rows, rs, cs) = (dst.rows, dst.rs, dst.cs);
    let part = |(from, to): (usize, usize)| {
        let rhs = View {
            data: &rhs.data[from * rhs.cs..],
            cols: to - from,
            ..rhs
        };
        #[allow(unsafe_code)]
        // SAFETY: `dst` is an exclusive borrow that outlives the scope below and every
        // index of its full view is in bounds (checked above); the parts cover
        // disjoint column ranges of it, so no element is written by two threads, and
        // the inputs are shared borrows that cannot alias it. `rhs`'s columns from
        // `from` are in bounds because the full view's are.
        unsafe {
            product(
                out.at(from * cs),
                rows,
                to - from,
                rs,
                cs,
                lhs,
                rhs,
                accumulate,
            )
        }
    };
    std::thread::scope(|s| {
        for &c in &cuts[1..] {
            s.spawn(move || part(c));
        }
        part(cuts[0]);
    });
}

/// The output of [`matmul_columns`], shared by its threads, which write disjoint
/// columns of it.
struct Shared(*mut f32);

impl Shared {
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

// SAFETY: only used within `matmul_columns`' scope, for disjoint writes.
#[allow(unsafe_code)]
unsafe impl Sync for Shared {}

/// Fills each row of a dense `rows × bias.len()` matrix with `bias`.
pub(crate) fn fill_rows(dst: &mut [f32], bias: &[f32]) {
    for row in dst.chunks_exact_mut(bias.len()) {
        row.copy_from_slice(bias);
    }
}

/// Adds `bias` to each row of a dense matrix.
pub(crate) fn add_rows(dst: &mut [f32], bias: &[f32]) {
    for row in dst.chunks_exact_mut(bias.len()) {
        for (x, b) in row.iter_mut().zip(bias) {
            *x += b;
        }
    }
}

/// Layer normalisation of each row, in place.
pub(crate) fn layer_norm(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let n = weight.len();
    for row in x.chunks_exact_mut(n) {
        let mean = row.iter().sum::<f32>() / n as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, w), b) in row.iter_mut().zip(weight).zip(bias) {
            *v = (*v - mean) * inv * w + b;
        }
    }
}

/// The error function, as a rational approximation (Eigen's `generic_fast_erf_float`):
/// branch-free, so GELU over a whole matrix vectorises; absolute error below 1e-6.
#[inline]
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_600_1e-3;
    p = x2 * p + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_473_9e-2;
    p / q
}

/// GELU as BERT defines it (`hidden_act = "gelu"`: the exact, erf-based form), in place.
pub(crate) fn gelu(x: &mut [f32]) {
    for v in x {
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// Softmax of each row of a dense matrix, in place.
pub(crate) fn softmax_rows(x: &mut [f32], cols: usize) {
    for row in x.chunks_exact_mut(cols) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    fn seq(len: usize, salt: f32) -> Vec<f32> {
        (0..len).map(|i| (i as f32 * 0.37 + salt).sin()).collect()
    }

    #[test]
    fn matmul_matches_the_definition_dense_strided_and_accumulating() {
        let (m, k, n) = (7, 13, 5);
        let a = seq(m * k, 0.1);
        let b = seq(k * n, 0.7);
        let want = naive(&a, &b, m, k, n);

        let mut c = vec![0.0; m * n];
        matmul(
            ViewMut::dense(&mut c, m, n),
            View::dense(&a, m, k),
            View::dense(&b, k, n),
            false,
        );
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }

        // b stored transposed (n × k), read through a transposed view; accumulate onto ones.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut c = vec![1.0; m * n];
        matmul(
            ViewMut::dense(&mut c, m, n),
            View::dense(&a, m, k),
            View::dense(&bt, n, k).t(),
            true,
        );
        for (x, y) in c.iter().zip(&want) {
            assert!((x - (y + 1.0)).abs() < 1e-5, "{x} vs {}", y + 1.0);
        }
    }

    #[test]
    fn column_shares_compute_the_same_product() {
        // Big enough to split (31 M multiply-adds), with a column count that is not a
        // multiple of the 16-column boundaries the shares are cut on.
        for (m, k, n) in [(70, 384, 1152), (70, 384, 1000), (3, 5, 7)] {
            let a = seq(m * k, 0.1);
            let b = seq(k * n, 0.7);
            let mut want = seq(m * n, 0.3);
            matmul(
                ViewMut::dense(&mut want, m, n),
                View::dense(&a, m, k),
                View::dense(&b, k, n),
                true,
            );
            for threads in 1..=3 {
                let mut got = seq(m * n, 0.3);
                matmul_columns(
                    ViewMut::dense(&mut got, m, n),
                    View::dense(&a, m, k),
                    View::dense(&b, k, n),
                    true,
                    threads,
                );
                for (i, (x, y)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (x - y).abs() < 1e-4,
                        "{m}×{k}×{n}, {threads} threads, at {i}: {x} vs {y}"
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn matmul_refuses_a_view_past_its_slice() {
        let a = vec![0.0; 5];
        let b = vec![0.0; 4];
        let mut c = vec![0.0; 4];
        let lhs = View {
            data: &a,
            rows: 2,
            cols: 2,
            rs: 3,
            cs: 1,
        };
        // last index 1 * 3 + 1 = 4 fits; make rhs reach past its end instead.
        let rhs = View {
            data: &b,
            rows: 2,
            cols: 2,
            rs: 3,
            cs: 1,
        };
        matmul(ViewMut::dense(&mut c, 2, 2), lhs, rhs, false);
    }

    #[test]
    fn erf_is_accurate_over_the_real_line() {
        // Reference values of erf (Abramowitz & Stegun, table 7.1), and the odd symmetry.
        let table: [(f32, f64); 8] = [
            (0.0, 0.0),
            (0.1, 0.112_462_916),
            (0.5, 0.520_499_878),
            (1.0, 0.842_700_793),
            (1.5, 0.966_105_146),
            (2.0, 0.995_322_265),
            (3.0, 0.999_977_910),
            (5.0, 1.0),
        ];
        for (x, want) in table {
            assert!((erf(x) as f64 - want).abs() < 1e-6, "erf({x}) = {}", erf(x));
            assert!(
                (erf(-x) as f64 + want).abs() < 1e-6,
                "erf(-{x}) = {}",
                erf(-x)
            );
        }
        // Monotone on a fine grid.
        let mut last = erf(-6.0);
        for i in -600..=600 {
            let v = erf(i as f32 / 100.0);
            assert!(v >= last - 1e-6, "erf not monotone at {}", i as f32 / 100.0);
            last = v;
        }
    }

    #[test]
    fn layer_norm_and_softmax_rows() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0, -1.0, -1.0, -1.0, -1.0];
        layer_norm(&mut x, &[1.0; 4], &[0.5; 4], 1e-12);
        let r0 = &x[..4];
        assert!((r0.iter().sum::<f32>() / 4.0 - 0.5).abs() < 1e-6);
        assert!((r0[3] - r0[0] - 2.0 * 1.5 / 1.25f32.sqrt()).abs() < 1e-5);
        assert!(x[4..].iter().all(|v| (v - 0.5).abs() < 1e-6), "a flat row");

        let mut s = vec![0.0, 0.0, 1000.0, 1.0, 2.0, 3.0];
        softmax_rows(&mut s, 3);
        assert!((s[2] - 1.0).abs() < 1e-6 && s[0] < 1e-30);
        assert!((s[3..].iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
