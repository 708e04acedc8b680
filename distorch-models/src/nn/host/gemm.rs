//! Matrix products for the host kernels ([`crate::nn::host`]): `matrixmultiply`'s `sgemm` on
//! borrowed, strided f32 matrices, bounds checked before any pointer is formed.

use rayon::prelude::*;

/// A read-only f32 matrix in a slice: element (i, j) at `i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

impl<'a> Mat<'a> {
    /// `rows × cols` stored row after row.
    pub(crate) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Mat<'a> {
        Mat::strided(data, rows, cols, cols as isize, 1)
    }

    /// `rows × cols` with the given (non-negative) strides.
    ///
    /// # Panics
    /// When the last element lies outside `data` (a caller's shape error).
    pub(crate) fn strided(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        rs: isize,
        cs: isize,
    ) -> Mat<'a> {
        assert!(rs >= 0 && cs >= 0, "negative strides");
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * rs as usize + (cols - 1) * cs as usize;
            assert!(last < data.len(), "matrix outside its slice");
        }
        Mat {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// Its number of rows.
    pub(crate) fn rows_len(&self) -> usize {
        self.rows
    }

    /// Its number of columns.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Columns `start..start + len`.
    fn columns(self, start: usize, len: usize) -> Mat<'a> {
        let offset = (start * self.cs as usize).min(self.data.len());
        Mat::strided(&self.data[offset..], self.rows, len, self.rs, self.cs)
    }

    /// Rows `start..start + len`.
    fn rows(self, start: usize, len: usize) -> Mat<'a> {
        let offset = (start * self.rs as usize).min(self.data.len());
        Mat::strided(&self.data[offset..], len, self.cols, self.rs, self.cs)
    }
}

/// `C ← alpha·A·B + beta·C` on this thread, C at `c` with strides `rsc`, `csc`.
///
/// # Safety
/// `c` must point at an `a.rows × b.cols` matrix with those strides that nothing else reads
/// or writes during the call.
///
/// # Panics
/// When the inner dimensions differ.
pub(crate) unsafe fn gemm(
    a: Mat<'_>,
    b: Mat<'_>,
    alpha: f32,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
) {
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    // SAFETY: `a` and `b` lie inside their slices (checked when made); `c` is the caller's.
    unsafe {
        matrixmultiply::sgemm(
            a.rows,
            a.cols,
            b.cols,
            alpha,
            a.data.as_ptr(),
            a.rs,
            a.cs,
            b.data.as_ptr(),
            b.rs,
            b.cs,
            beta,
            c,
            rsc,
            csc,
        );
    }
}

/// `C ← A·B + beta·C` with C's `a.rows × n` elements in `c` from its start, rows `ldc` apart
/// (`ldc ≥ n`), its rows split between rayon's threads; each element is summed by one thread
/// in `sgemm`'s order.
///
/// # Panics
/// When the shapes disagree or `c` is too short.
pub(crate) fn gemm_rows(a: Mat<'_>, b: Mat<'_>, beta: f32, c: &mut [f32], n: usize, ldc: usize) {
    assert_eq!(b.cols, n, "output width differs");
    assert!(ldc >= n, "output rows overlap");
    if n == 0 || a.rows == 0 {
        return;
    }
    assert!(c.len() >= (a.rows - 1) * ldc + n, "output too short");
    let c = &mut c[..(a.rows - 1) * ldc + n];
    let threads = rayon::current_num_threads().max(1);
    if n > a.rows && threads > 1 {
        // Few rows (a linear layer on a small latent): split the columns instead, so each
        // thread packs only its part of B (the weight) rather than all of it.
        let per = n.div_ceil(threads).div_ceil(8) * 8;
        let dst = Dst(c.as_mut_ptr());
        (0..n.div_ceil(per)).into_par_iter().for_each(|i| {
            let (start, len) = (i * per, per.min(n - i * per));
            // SAFETY: columns `start..start + len` of every row: this task's own elements,
            // inside `c` (checked above).
            unsafe {
                let at = dst.at(start);
                gemm(a, b.columns(start, len), 1.0, beta, at, ldc as isize, 1)
            };
        });
        return;
    }
    // Whole 8-row panels (sgemm's register block) per task.
    let per = a.rows.div_ceil(threads).div_ceil(8) * 8;
    c.par_chunks_mut(per * ldc)
        .enumerate()
        .for_each(|(i, chunk)| {
            let len = chunk.len().div_ceil(ldc);
            // SAFETY: `chunk` holds this task's `len` rows of `n` elements, `ldc` apart (the last
            // row at least `n` long: `c` ends at the last row's `n`-th element).
            unsafe {
                gemm(
                    a.rows(i * per, len),
                    b,
                    1.0,
                    beta,
                    chunk.as_mut_ptr(),
                    ldc as isize,
                    1,
                )
            };
        });
}

/// The output of a column-split product, written by many tasks at disjoint columns.
struct Dst(*mut f32);
// SAFETY: the tasks write disjoint elements (see `gemm_rows`).
unsafe impl Sync for Dst {}

impl Dst {
    /// The element `offset` past the start (a method, so closures capture the whole `Dst`).
    ///
    /// # Safety
    /// `offset` must stay inside the output.
    unsafe fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: the caller's.
        unsafe { self.0.add(offset) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_products_match_the_definition() {
        // Rows split (m > n), then columns split (n > m).
        for (m, k, n) in [(19, 7, 5), (3, 7, 29)] {
            product_matches_the_definition(m, k, n);
        }
    }

    fn product_matches_the_definition(m: usize, k: usize, n: usize) {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 11) as f32 - 5.0).collect();
        // B stored transposed: element (i, j) at j·k + i.
        let bt: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.5).collect();
        let mut c = vec![1.0; m * n];
        gemm_rows(
            Mat::row_major(&a, m, k),
            Mat::strided(&bt, k, n, 1, k as isize),
            1.0,
            &mut c,
            n,
            n,
        );
        for i in 0..m {
            for j in 0..n {
                let want = 1.0 + (0..k).map(|t| a[i * k + t] * bt[j * k + t]).sum::<f32>();
                assert_eq!(c[i * n + j], want, "({i}, {j})");
            }
        }
    }

    #[test]
    #[should_panic(expected = "matrix outside its slice")]
    fn a_matrix_larger_than_its_slice_is_refused() {
        let data = [0.0f32; 5];
        let _ = Mat::row_major(&data, 2, 3);
    }
}
