//! The report's figures drawn with plotters: throughput speedup against ranks (Fig. 2),
//! training loss against wall time (Fig. 3) and validation Dice against wall time (Fig. 4),
//! each rendered to SVG and to PNG (an in-memory RGB bitmap encoded with the `png` crate). Text
//! uses the DejaVu Sans font embedded from `assets/fonts`, never the system's fonts.

use std::sync::OnceLock;

use plotters::backend::RGBPixel;
use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::runs::short_device;
use super::tables::{Speedup, target_text};

/// Figure size in pixels (PNG) and user units (SVG).
pub(crate) const WIDTH: u32 = 1200;
/// See [`WIDTH`].
pub(crate) const HEIGHT: u32 = 800;

const CAPTION_PX: u32 = 30;
const AXIS_DESC_PX: u32 = 22;
const TICK_PX: u32 = 18;
const LEGEND_PX: u32 = 18;
const NOTE_PX: u32 = 17;

/// Lines drawn per run at most (longer series are thinned evenly).
const MAX_POINTS: usize = 2000;

/// matplotlib's "tab10": distinct on white and for the common colour-vision deficiencies.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const GRID: RGBColor = RGBColor(220, 220, 220);
const REFERENCE: RGBColor = RGBColor(90, 90, 90);

/// The font, embedded so that figures look the same on every machine.
const FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Registers the embedded font as "sans-serif" once; `false` if it could not be parsed.
fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT_BYTES).is_ok()
    })
}

fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn text_style(px: u32) -> TextStyle<'static> {
    ("sans-serif", px).into_font().color(&BLACK)
}

/// A figure that draws itself on any plotters backend.
pub(crate) trait Figure {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<(), DB>;
}

/// Renders `fig` as an SVG document.
pub(crate) fn render_svg(fig: &impl Figure) -> Result<String, String> {
    if !font_ready() {
        return Err("the embedded font assets/fonts/DejaVuSans.ttf could not be loaded".into());
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        fig.draw(&root).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// Renders `fig` as a PNG file's bytes (8-bit RGB).
pub(crate) fn render_png(fig: &impl Figure) -> Result<Vec<u8>, String> {
    if !font_ready() {
        return Err("the embedded font assets/fonts/DejaVuSans.ttf could not be loaded".into());
    }
    let mut rgb = vec![255u8; WIDTH as usize * HEIGHT as usize * 3];
    {
        let backend = BitMapBackend::<RGBPixel>::with_buffer_and_format(&mut rgb, (WIDTH, HEIGHT))
            .map_err(|e| e.to_string())?;
        let root = backend.into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        fig.draw(&root).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    encode_png(&rgb, WIDTH, HEIGHT)
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Best);
    let mut w = enc.write_header().map_err(|e| format!("PNG header: {e}"))?;
    w.write_image_data(rgb)
        .map_err(|e| format!("PNG data: {e}"))?;
    w.finish().map_err(|e| format!("PNG end: {e}"))?;
    Ok(out)
}

/// Keeps at most `max` evenly spaced points (always the last one).
fn thin(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max || max < 2 {
        return points.to_vec();
    }
    let stride = points.len().div_ceil(max - 1);
    let mut out: Vec<(f64, f64)> = points.iter().step_by(stride).copied().collect();
    if let Some(&last) = points.last()
        && out.last() != Some(&last)
    {
        out.push(last);
    }
    out
}

/// Wall-time axis unit: (seconds per unit, name). Hours past 2 h, else minutes.
pub(crate) fn time_unit(max_s: f64) -> (f64, &'static str) {
    if max_s > 2.0 * 3600.0 {
        (3600.0, "hours")
    } else {
        (60.0, "minutes")
    }
}

/// A tick label with a true minus sign and no needless digits.
fn tick(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    if s == "-0" {
        "0".into()
    } else {
        s.replace('-', "−")
    }
}

/// Decimals that tell ticks `step` apart.
fn decimals_for(step: f64) -> usize {
    if step <= 0.0 || !step.is_finite() {
        2
    } else {
        (-(step.log10().floor()) as i64).clamp(0, 6) as usize
    }
}

/// `lo..hi` padded by `frac` of its span (a zero span becomes ±0.5).
fn padded(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    if span <= 0.0 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo - frac * span, hi + frac * span)
    }
}

const X_LABEL_AREA: u32 = 70;
const Y_LABEL_AREA: u32 = 100;
const LEGEND_MARGIN: u32 = 16;
const LEGEND_SAMPLE: u32 = 40;

/// The figure less its margins and caption: where the chart goes.
fn chart_area<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
) -> DrawResult<DrawingArea<DB, Shift>, DB> {
    root.margin(16, 16, 24, 32)
        .titled(title, text_style(CAPTION_PX))
}

/// A chart on `area` with the report's label areas.
fn chart_builder<'a, 'b, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
) -> ChartBuilder<'a, 'b, DB> {
    let mut b = ChartBuilder::on(area);
    b.x_label_area_size(X_LABEL_AREA)
        .y_label_area_size(Y_LABEL_AREA);
    b
}

/// Where the legend of `labels` goes: the first corner of `prefs` where it covers none of
/// `lines` (data coordinates on the axes `x` × `y`), else the upper corner of `prefs` after
/// raising the top of the y axis so that a band above the data holds it. Returns the corner
/// and the (possibly raised) top of the y axis.
fn plan_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    labels: &[String],
    lines: &[Vec<(f64, f64)>],
    x: (f64, f64),
    y: (f64, f64),
    prefs: &[SeriesLabelPosition],
) -> DrawResult<(SeriesLabelPosition, f64), DB> {
    let first = prefs
        .first()
        .cloned()
        .unwrap_or(SeriesLabelPosition::UpperRight);
    if labels.is_empty() {
        return Ok((first, y.1));
    }
    // The plotting area: what a chart with these label areas leaves (building draws nothing).
    let (pw, ph) = chart_builder(area)
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)?
        .plotting_area()
        .dim_in_pixel();
    let (pw, ph) = (f64::from(pw), f64::from(ph));
    let style = text_style(LEGEND_PX);
    let mut text_w = 0u32;
    let mut text_h = 0u32;
    for l in labels {
        let (w, h) = area.estimate_text_size(l, &style)?;
        text_w = text_w.max(w);
        text_h = text_h.max(h);
    }
    let lw = f64::from(text_w + LEGEND_SAMPLE + 2 * LEGEND_MARGIN) + 12.0;
    let lh = (labels.len() - 1) as f64 * 1.25 * f64::from(LEGEND_PX)
        + f64::from(text_h + 2 * LEGEND_MARGIN)
        + 12.0;
    let hits = |pos: &SeriesLabelPosition, y_hi: f64| -> usize {
        use SeriesLabelPosition::*;
        let x0 = match pos {
            UpperLeft | MiddleLeft | LowerLeft => 0.0,
            _ => pw - lw,
        };
        let y0 = match pos {
            UpperLeft | UpperMiddle | UpperRight => 0.0,
            _ => ph - lh,
        };
        let to_px = |(vx, vy): (f64, f64)| {
            (
                (vx - x.0) / (x.1 - x.0) * pw,
                (1.0 - (vy - y.0) / (y_hi - y.0)) * ph,
            )
        };
        let inside = |(px, py): (f64, f64)| px >= x0 && px <= x0 + lw && py >= y0 && py <= y0 + lh;
        let mut n = 0;
        for line in lines {
            let pts: Vec<(f64, f64)> = line
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .map(|&p| to_px(p))
                .collect();
            if pts.len() == 1 {
                n += usize::from(inside(pts[0]));
            }
            for w in pts.windows(2) {
                let (a, b) = (w[0], w[1]);
                let steps = ((b.0 - a.0).hypot(b.1 - a.1) / 3.0)
                    .ceil()
                    .clamp(1.0, 2000.0) as usize;
                n += (0..=steps)
                    .filter(|&k| {
                        let t = k as f64 / steps as f64;
                        inside((a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1)))
                    })
                    .count();
            }
        }
        n
    };
    if let Some(p) = prefs.iter().find(|p| hits(p, y.1) == 0) {
        return Ok((p.clone(), y.1));
    }
    // Raise the top: the data keeps the lower (1 − f) of the height, the legend the band above.
    let f = ((lh + 8.0) / ph).min(0.6);
    let y_hi = y.0 + (y.1 - y.0) / (1.0 - f);
    let upper = prefs
        .iter()
        .filter(|p| {
            matches!(
                p,
                SeriesLabelPosition::UpperLeft | SeriesLabelPosition::UpperRight
            )
        })
        .min_by_key(|p| hits(p, y_hi))
        .cloned()
        .unwrap_or(SeriesLabelPosition::UpperRight);
    Ok((upper, y_hi))
}

/// Draws the legend of `chart` at `pos`: white background, black border.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    pos: SeriesLabelPosition,
) -> DrawResult<(), DB> {
    chart
        .configure_series_labels()
        .position(pos)
        .margin(LEGEND_MARGIN)
        .legend_area_size(LEGEND_SAMPLE)
        .label_font(text_style(LEGEND_PX))
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()
}

/// Fig. 2: speedup in throughput (images/s) against ranks, both on log₂ axes.
pub(crate) struct SpeedupFigure<'a> {
    pub data: &'a Speedup,
    pub title: String,
}

/// Tick positions (log₂ of the value) between `lo` and `hi`: the powers of two, with the
/// 1.5 × 2ᵏ values added when fewer than 3 powers fall inside.
fn log2_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut t: Vec<f64> = ((lo.ceil() as i64)..=(hi.floor() as i64))
        .map(|k| k as f64)
        .collect();
    if t.len() < 3 {
        for k in (lo.floor() as i64 - 1)..=(hi.ceil() as i64) {
            let v = k as f64 + 1.5f64.log2();
            if v >= lo && v <= hi {
                t.push(v);
            }
        }
        t.sort_by(f64::total_cmp);
    }
    t
}

/// The value at a log₂ position, as a tick label ("0.5", "1", "1.5", "16").
fn pow2_label(v: &f64) -> String {
    let x = 2f64.powf(*v);
    if (x - x.round()).abs() < 1e-6 {
        format!("{}", x.round())
    } else {
        tick(x, 2)
    }
}

/// A linear axis (over log₂ values here) whose ticks are given, for the powers of two. (The
/// built-in key-point wrapper cannot take a label formatter.)
#[derive(Clone)]
struct TickAxis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for TickAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let f = (value - self.lo) / (self.hi - self.lo);
        limit.0 + (f * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// A polyline in log₂ coordinates.
type Line = Vec<(f64, f64)>;

/// Fig. 2's content in log₂ coordinates (see [`SpeedupFigure::geometry`]).
struct SpeedupGeometry {
    x: (f64, f64),
    y: (f64, f64),
    /// One ideal (linear) line per distinct base rank count.
    ideal: Vec<Line>,
    /// Per series: the median speedup per rank count.
    medians: Vec<Line>,
    /// Per series: every run.
    markers: Vec<Line>,
    /// Per GPU run: a horizontal line.
    gpu_lines: Vec<Line>,
}

impl SpeedupFigure<'_> {
    /// The label of a GPU run's line.
    fn gpu_label(&self, g: &super::tables::GpuRef) -> String {
        let s = &self.data.series[g.series];
        let ranks = if g.ranks > 1 {
            format!(", {} ranks", g.ranks)
        } else {
            String::new()
        };
        format!(
            "GPU: {}{ranks} — {}× the speed of the {}-rank CPU run",
            short_device(&g.device),
            tick(g.speedup, 2),
            s.base_ranks
        )
    }

    /// What the figure draws, in log₂ coordinates: ideal lines, each series' medians and runs,
    /// the GPU lines; and the ranges that hold them.
    fn geometry(&self) -> SpeedupGeometry {
        let sp = self.data;
        let ranks: Vec<f64> = sp
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.ranks as f64))
            .collect();
        let (rmin, rmax) = ranks
            .iter()
            .fold((f64::INFINITY, 0.0f64), |(a, b), &r| (a.min(r), b.max(r)));
        let (rmin, rmax) = if ranks.is_empty() {
            (1.0, 1.0)
        } else {
            (rmin, rmax)
        };
        let x_lo = rmin.log2() - 0.35;
        let x_hi = (rmax.log2() + 0.35).max(x_lo + 1.0);
        let mut bases: Vec<u64> = sp.series.iter().map(|s| s.base_ranks).collect();
        bases.sort_unstable();
        bases.dedup();
        let ideal: Vec<Line> = bases
            .iter()
            .map(|&b| {
                let r0 = (b as f64).log2();
                vec![(x_lo, x_lo - r0), (x_hi, x_hi - r0)]
            })
            .collect();
        let medians: Vec<Line> = sp
            .series
            .iter()
            .map(|s| {
                s.median_line()
                    .into_iter()
                    .map(|(r, v)| ((r as f64).log2(), v.log2()))
                    .collect()
            })
            .collect();
        let markers: Vec<Line> = sp
            .series
            .iter()
            .map(|s| {
                s.points
                    .iter()
                    .map(|p| ((p.ranks as f64).log2(), p.speedup.log2()))
                    .collect()
            })
            .collect();
        let gpu_lines: Vec<Line> = sp
            .gpu
            .iter()
            .map(|g| vec![(x_lo, g.speedup.log2()), (x_hi, g.speedup.log2())])
            .collect();

        // The y range: the data, and the ideal lines over the data's ranks.
        let mut ys: Vec<f64> = Vec::new();
        for (s, m) in sp.series.iter().zip(&markers) {
            let r0 = (s.base_ranks as f64).log2();
            ys.push(rmin.log2() - r0);
            ys.push(rmax.log2() - r0);
            ys.extend(m.iter().map(|p| p.1));
        }
        ys.extend(sp.gpu.iter().map(|g| g.speedup.log2()));
        ys.retain(|v| v.is_finite());
        let (y_lo, y_hi) = match finite_range(ys.iter()) {
            Some((a, b)) => (a - 0.35, (b + 0.35).max(a + 1.0)),
            None => (-1.0, 1.0),
        };
        SpeedupGeometry {
            x: (x_lo, x_hi),
            y: (y_lo, y_hi),
            ideal,
            medians,
            markers,
            gpu_lines,
        }
    }

    /// The y axis' description: what the speedups are relative to.
    fn y_desc(&self) -> String {
        let sp = self.data;
        if sp.series.is_empty() || sp.all_base_one() {
            "speedup in throughput (images/s) over the 1-rank CPU run (×, log scale)".to_string()
        } else if sp
            .series
            .iter()
            .all(|s| s.base_ranks == sp.series[0].base_ranks)
        {
            format!(
                "speedup in images/s over the {}-rank CPU run (no 1-rank run; ×, log scale)",
                sp.series[0].base_ranks
            )
        } else {
            "speedup in images/s over each series' smallest-rank CPU run (no 1-rank run; ×, log)"
                .to_string()
        }
    }
}

impl Figure for SpeedupFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<(), DB> {
        let sp = self.data;
        // 1. Everything drawn, in log₂ coordinates, and the ranges that hold it.
        let SpeedupGeometry {
            x: (x_lo, x_hi),
            y: (y_lo, y_hi),
            ideal,
            medians,
            markers,
            gpu_lines,
        } = self.geometry();
        // 2. The legend where it hides the least, the axes.
        let mut labels = Vec::new();
        if !sp.series.is_empty() {
            labels.push("ideal (linear in ranks)".to_string());
        }
        labels.extend(sp.series.iter().map(|s| s.name()));
        labels.extend(sp.gpu.iter().map(|g| self.gpu_label(g)));
        let lines: Vec<Line> = ideal
            .iter()
            .chain(&medians)
            .chain(&markers)
            .chain(&gpu_lines)
            .cloned()
            .collect();
        let area = chart_area(root, &self.title)?;
        let (legend_pos, y_hi) = plan_legend(
            &area,
            &labels,
            &lines,
            (x_lo, x_hi),
            (y_lo, y_hi),
            &[
                SeriesLabelPosition::UpperLeft,
                SeriesLabelPosition::LowerRight,
                SeriesLabelPosition::UpperRight,
            ],
        )?;
        let y_desc = self.y_desc();
        let mut chart = chart_builder(&area).build_cartesian_2d(
            TickAxis {
                lo: x_lo,
                hi: x_hi,
                ticks: log2_ticks(x_lo, x_hi),
            },
            TickAxis {
                lo: y_lo,
                hi: y_hi,
                ticks: log2_ticks(y_lo, y_hi),
            },
        )?;
        chart
            .configure_mesh()
            .x_desc("ranks (MPI processes, log scale)")
            .y_desc(y_desc)
            .axis_desc_style(text_style(AXIS_DESC_PX))
            .label_style(text_style(TICK_PX))
            .x_label_formatter(&pow2_label)
            .y_label_formatter(&pow2_label)
            .bold_line_style(GRID)
            .draw()?;

        // 3. With no CPU series, why the plot is empty.
        if sp.series.is_empty() {
            let msg = if sp.gpu.is_empty() {
                "no run with a known epoch time and rank count"
            } else {
                "no CPU run to normalise to"
            };
            chart.draw_series(std::iter::once(Text::new(
                msg,
                ((x_lo + x_hi) / 2.0, (y_lo + y_hi) / 2.0),
                text_style(AXIS_DESC_PX).pos(Pos::new(HPos::Center, VPos::Center)),
            )))?;
        }

        // 4. Ideal linear speedup, one dashed line per distinct base rank count.
        for (k, pts) in ideal.into_iter().enumerate() {
            let style = REFERENCE.stroke_width(2);
            let anno = chart.draw_series(DashedLineSeries::new(pts, 10, 8, style))?;
            if k == 0 {
                anno.label("ideal (linear in ranks)").legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x, y), (x + 30, y)], 6, 4, style)
                });
            }
        }

        // 5. CPU series: the median speedup per rank count as a line labelled with its values,
        // every run as a marker.
        for (i, s) in sp.series.iter().enumerate() {
            let c = colour(i);
            chart
                .draw_series(LineSeries::new(medians[i].clone(), c.stroke_width(3)))?
                .label(s.name())
                .legend(move |(x, y)| {
                    EmptyElement::at((x + 15, y))
                        + PathElement::new(vec![(-15, 0), (15, 0)], c.stroke_width(3))
                        + Circle::new((0, 0), 6, c.filled())
                });
            chart.draw_series(markers[i].iter().map(|&p| Circle::new(p, 7, c.filled())))?;
            chart.draw_series(medians[i].iter().map(|&(x, y)| {
                EmptyElement::at((x, y))
                    + Text::new(
                        format!("{}×", tick(2f64.powf(y), 2)),
                        (10, 8),
                        text_style(NOTE_PX).color(&c),
                    )
            }))?;
        }

        // 6. GPU runs: horizontal reference lines, named at their right end.
        for (j, (g, pts)) in sp.gpu.iter().zip(gpu_lines).enumerate() {
            let c = colour(sp.series.len() + j);
            let y = pts[0].1;
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(3)))?
                .label(self.gpu_label(g))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 30, y)], c.stroke_width(3))
                });
            chart.draw_series(std::iter::once(
                EmptyElement::at((x_hi, y))
                    + Text::new(
                        format!("{}: {}×", g.label, tick(g.speedup, 2)),
                        (-10, -26),
                        text_style(NOTE_PX)
                            .color(&c)
                            .pos(Pos::new(HPos::Right, VPos::Top)),
                    ),
            ))?;
        }
        // 7. The legend.
        draw_legend(&mut chart, legend_pos)
    }
}

/// One run's loss curve for Fig. 3 (seconds).
pub(crate) struct LossCurve {
    pub label: String,
    pub raw: Vec<(f64, f64)>,
    pub smooth: Vec<(f64, f64)>,
}

/// Fig. 3: training loss against wall time.
pub(crate) struct LossFigure {
    pub curves: Vec<LossCurve>,
    pub targets: Vec<f64>,
    pub window: usize,
    pub title: String,
}

fn finite_range<'a>(values: impl Iterator<Item = &'a f64>) -> Option<(f64, f64)> {
    values
        .filter(|v| v.is_finite())
        .fold(None, |acc, &v| match acc {
            None => Some((v, v)),
            Some((a, b)) => Some((a.min(v), b.max(v))),
        })
}

/// Thinned points in `unit_s` units of time, finite only.
fn in_unit(pts: &[(f64, f64)], unit_s: f64) -> Vec<(f64, f64)> {
    thin(pts, MAX_POINTS)
        .into_iter()
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .map(|(x, y)| (x / unit_s, y))
        .collect()
}

impl Figure for LossFigure {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<(), DB> {
        let max_s = self
            .curves
            .iter()
            .flat_map(|c| c.raw.iter().map(|p| p.0))
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        let (unit_s, unit) = time_unit(max_s);
        let x_hi = if max_s > 0.0 {
            max_s / unit_s * 1.02
        } else {
            1.0
        };
        let ys: Vec<f64> = self
            .curves
            .iter()
            .flat_map(|c| c.raw.iter().map(|p| p.1))
            .chain(self.targets.iter().copied())
            .collect();
        let (lo, hi) = finite_range(ys.iter()).unwrap_or((-1.0, 0.0));
        let (y_lo, y_hi) = padded(lo, hi, 0.05);

        // What is drawn: faint raw steps, the bold moving average (or the raw steps of a run
        // shorter than the window), the targets.
        let raw: Vec<Vec<(f64, f64)>> = self
            .curves
            .iter()
            .map(|c| in_unit(&c.raw, unit_s))
            .collect();
        let bold: Vec<(Vec<(f64, f64)>, String)> = self
            .curves
            .iter()
            .zip(&raw)
            .map(|(c, r)| {
                let smooth = in_unit(&c.smooth, unit_s);
                if smooth.is_empty() {
                    (r.clone(), format!("{} (each step)", c.label))
                } else {
                    (smooth, c.label.clone())
                }
            })
            .collect();
        let target_lines: Vec<Vec<(f64, f64)>> = self
            .targets
            .iter()
            .map(|&t| vec![(0.0, t), (x_hi, t)])
            .collect();
        let mut labels = Vec::new();
        let target_label = format!(
            "loss targets: {}",
            self.targets
                .iter()
                .map(|&t| target_text(t))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if !self.targets.is_empty() {
            labels.push(target_label.clone());
        }
        labels.extend(bold.iter().map(|b| b.1.clone()));
        let lines: Vec<Vec<(f64, f64)>> = raw
            .iter()
            .cloned()
            .chain(bold.iter().map(|b| b.0.clone()))
            .chain(target_lines.iter().cloned())
            .collect();

        let area = chart_area(root, &self.title)?;
        let (legend_pos, y_hi) = plan_legend(
            &area,
            &labels,
            &lines,
            (0.0, x_hi),
            (y_lo, y_hi),
            &[
                SeriesLabelPosition::UpperRight,
                SeriesLabelPosition::LowerLeft,
                SeriesLabelPosition::UpperLeft,
                SeriesLabelPosition::LowerRight,
            ],
        )?;
        let y_top = if legend_pos == SeriesLabelPosition::UpperRight
            || legend_pos == SeriesLabelPosition::UpperLeft
        {
            // Labels stop at the data when room was made above it for the legend.
            padded(lo, hi, 0.05).1
        } else {
            y_hi
        };
        let y_dec = decimals_for((y_top - y_lo) / 10.0);
        let mut chart = chart_builder(&area).build_cartesian_2d(0.0..x_hi, y_lo..y_hi)?;
        let x_dec = decimals_for(x_hi / 10.0);
        let xf = move |v: &f64| tick(*v, x_dec);
        let yf = move |v: &f64| {
            if *v > y_top + 1e-9 {
                String::new()
            } else {
                tick(*v, y_dec)
            }
        };
        chart
            .configure_mesh()
            .x_desc(format!("wall time ({unit})"))
            .y_desc("training loss (−Dice; lower is better)")
            .axis_desc_style(text_style(AXIS_DESC_PX))
            .label_style(text_style(TICK_PX))
            .x_label_formatter(&xf)
            .y_label_formatter(&yf)
            .bold_line_style(GRID)
            .light_line_style(WHITE)
            .draw()?;

        if raw.iter().all(Vec::is_empty) {
            chart.draw_series(std::iter::once(Text::new(
                "no training steps recorded",
                (x_hi / 2.0, (y_lo + y_hi) / 2.0),
                text_style(AXIS_DESC_PX).pos(Pos::new(HPos::Center, VPos::Center)),
            )))?;
        }

        let style = REFERENCE.stroke_width(1);
        for (k, pts) in target_lines.into_iter().enumerate() {
            let anno = chart.draw_series(DashedLineSeries::new(pts, 6, 6, style))?;
            if k == 0 {
                anno.label(target_label.clone()).legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x, y), (x + 30, y)], 6, 4, style)
                });
            }
        }
        for (i, r) in raw.into_iter().enumerate() {
            chart.draw_series(LineSeries::new(r, colour(i).mix(0.3).stroke_width(1)))?;
        }
        for (i, (pts, label)) in bold.into_iter().enumerate() {
            let col = colour(i);
            chart
                .draw_series(LineSeries::new(pts, col.stroke_width(3)))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 30, y)], col.stroke_width(3))
                });
        }
        draw_legend(&mut chart, legend_pos)?;
        if self.window > 1 {
            root.draw(&Text::new(
                format!(
                    "bold: mean of the last {} steps; faint: each step",
                    self.window
                ),
                (24, (HEIGHT - 28) as i32),
                text_style(NOTE_PX).color(&REFERENCE),
            ))?;
        }
        Ok(())
    }
}

/// One run's validation curves for Fig. 4 (seconds).
pub(crate) struct DiceCurve {
    pub label: String,
    pub liver: Vec<(f64, f64)>,
    pub tumour: Vec<(f64, f64)>,
}

/// Fig. 4: validation Dice of liver and tumour against wall time.
pub(crate) struct DiceFigure {
    pub curves: Vec<DiceCurve>,
    pub target: f64,
    pub title: String,
}

impl Figure for DiceFigure {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<(), DB> {
        let max_s = self
            .curves
            .iter()
            .flat_map(|c| c.liver.iter().chain(c.tumour.iter()).map(|p| p.0))
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        let (unit_s, unit) = time_unit(max_s);
        let x_hi = if max_s > 0.0 {
            max_s / unit_s * 1.05
        } else {
            1.0
        };
        let liver: Vec<Vec<(f64, f64)>> = self
            .curves
            .iter()
            .map(|c| in_unit(&c.liver, unit_s))
            .collect();
        let tumour: Vec<Vec<(f64, f64)>> = self
            .curves
            .iter()
            .map(|c| in_unit(&c.tumour, unit_s))
            .collect();
        let target_line = vec![(0.0, self.target), (x_hi, self.target)];
        let target_label = format!("target: liver Dice ≥ {}", target_text(self.target));
        let mut labels = vec![target_label.clone()];
        for c in &self.curves {
            labels.push(format!("{}: liver", c.label));
            labels.push(format!("{}: tumour", c.label));
        }
        let lines: Vec<Vec<(f64, f64)>> = liver
            .iter()
            .chain(&tumour)
            .cloned()
            .chain(std::iter::once(target_line.clone()))
            .collect();
        let area = chart_area(root, &self.title)?;
        let (legend_pos, y_hi) = plan_legend(
            &area,
            &labels,
            &lines,
            (0.0, x_hi),
            (0.0, 1.02),
            &[
                SeriesLabelPosition::LowerRight,
                SeriesLabelPosition::UpperLeft,
                SeriesLabelPosition::LowerLeft,
                SeriesLabelPosition::UpperRight,
            ],
        )?;
        let mut chart = chart_builder(&area).build_cartesian_2d(0.0..x_hi, 0.0..y_hi)?;
        let x_dec = decimals_for(x_hi / 10.0);
        let xf = move |v: &f64| tick(*v, x_dec);
        // Room made above 1 for the legend carries no labels: Dice stops at 1.
        let yf = |v: &f64| {
            if *v > 1.0 + 1e-9 {
                String::new()
            } else {
                tick(*v, 1)
            }
        };
        chart
            .configure_mesh()
            .x_desc(format!("wall time ({unit})"))
            .y_desc("validation Dice (hard, threshold 0.5)")
            .axis_desc_style(text_style(AXIS_DESC_PX))
            .label_style(text_style(TICK_PX))
            .x_label_formatter(&xf)
            .y_label_formatter(&yf)
            .bold_line_style(GRID)
            .light_line_style(WHITE)
            .draw()?;

        if liver.iter().chain(&tumour).all(Vec::is_empty) {
            chart.draw_series(std::iter::once(Text::new(
                "no validation records",
                (x_hi / 2.0, 0.5),
                text_style(AXIS_DESC_PX).pos(Pos::new(HPos::Center, VPos::Center)),
            )))?;
        }

        let tstyle = REFERENCE.stroke_width(1);
        chart
            .draw_series(DashedLineSeries::new(target_line, 6, 6, tstyle))?
            .label(target_label)
            .legend(move |(x, y)| DashedPathElement::new(vec![(x, y), (x + 30, y)], 6, 4, tstyle));
        for (i, ((c, l), t)) in self.curves.iter().zip(liver).zip(tumour).enumerate() {
            let col = colour(i);
            chart
                .draw_series(LineSeries::new(l.clone(), col.stroke_width(3)))?
                .label(format!("{}: liver", c.label))
                .legend(move |(x, y)| {
                    EmptyElement::at((x + 15, y))
                        + PathElement::new(vec![(-15, 0), (15, 0)], col.stroke_width(3))
                        + Circle::new((0, 0), 5, col.filled())
                });
            chart.draw_series(l.iter().map(|&p| Circle::new(p, 6, col.filled())))?;
            chart
                .draw_series(DashedLineSeries::new(t.clone(), 10, 7, col.stroke_width(3)))?
                .label(format!("{}: tumour", c.label))
                .legend(move |(x, y)| {
                    EmptyElement::at((x + 15, y))
                        + DashedPathElement::new(vec![(-15, 0), (15, 0)], 6, 4, col.stroke_width(3))
                        + TriangleMarker::new((0, 0), 7, col.filled())
                });
            chart.draw_series(t.iter().map(|&p| TriangleMarker::new(p, 8, col.filled())))?;
        }
        draw_legend(&mut chart, legend_pos)?;
        root.draw(&Text::new(
            "solid, circles: liver (liver ∪ tumour); dashed, triangles: tumour",
            (24, (HEIGHT - 28) as i32),
            text_style(NOTE_PX).color(&REFERENCE),
        ))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_ticks_and_units() {
        assert_eq!(log2_ticks(-0.35, 2.35), vec![0.0, 1.0, 2.0]);
        let narrow = log2_ticks(-0.35, 0.65);
        assert!(narrow.contains(&0.0) && narrow.len() >= 2, "{narrow:?}");
        assert_eq!(pow2_label(&3.0), "8");
        assert_eq!(pow2_label(&-1.0), "0.5");
        assert_eq!(pow2_label(&1.5f64.log2()), "1.5");
        assert_eq!(tick(-0.75, 2), "−0.75");
        assert_eq!(tick(2.0, 2), "2");
        assert_eq!(time_unit(7200.0).1, "minutes");
        assert_eq!(time_unit(7201.0).1, "hours");
        let pts: Vec<(f64, f64)> = (0..10_000).map(|i| (i as f64, 0.0)).collect();
        let t = thin(&pts, 100);
        assert!(t.len() <= 101 && t.last() == pts.last());
    }
}
