"""The built-in phantom: a MIMIC-CXR-JPG + MIMIC-IV look-alike with procedurally drawn radiographs.

It stands in for the credentialed data wherever the real data is absent, so it is written in
the real layout (DATA_SPEC.md) and read by the real cohort builder unchanged:

    OUT/mimic-cxr-jpg/files/p{first 2 digits}/p{subject_id}/s{study_id}/{dicom_id}.jpg
    OUT/mimic-cxr-jpg/mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz
    OUT/mimic-iv/hosp/{patients,admissions}.csv.gz
    OUT/phantom_truth.json      what was planted, realised prevalences, counts per group
    OUT/regions/{dicom_id}.png  where each finding was drawn (16-bit bit mask; regions/legend.json)

    python -m cxr_fast.data.phantom --out DIR --n-images N --seed S [--image-size 512] [--no-bias]

Modules: population (the tables, `sample_tables`), drawing (`draw_radiograph`; exposure: density to film), write
(`generate_phantom`), truth (`phantom_truth.json`), regions (the finding masks), __main__ (the command line).

Population (`sample_tables`, no pixels involved)
  - Studies per subject: geometric, mean 1.6. Images per study: frontal only 55 %, frontal +
    lateral 40 %, two frontals + lateral 3 %, lateral only 2 % (mean 1.46). So images per
    subject is about 2.3 (MIMIC's 81,432 images / 35,143 patients) and about 31 % of images
    are laterals (ViewPosition LATERAL or LL); frontals are AP (55 %) or PA per study.
  - Labels per study, from a latent state: a third of studies are normal; the rest have at
    least one positive finding, with a heart-failure component that makes cardiomegaly,
    effusion and edema co-occur, and a per-subject propensity so a patient's studies resemble
    each other. Among frontal labelled images (uncertain excluded) prevalences come out near
    MIMIC's: cardiomegaly 20 %, effusion 24 %, edema 12 %, fracture 2.5 %, consolidation OR
    pneumonia 10 %, no finding 33 %. `No Finding` is 1.0 exactly when none of the other 13
    labels is 1.0, else blank. Sick studies carry uncertain (-1.0) labels; every study has
    explicit 0.0 negatives and blanks. 2 % of studies have no chexpert row (their images are
    still drawn from the latent findings).
  - Demographics are independent of the labels (so the only built-in disparity is the planted
    one): sex M/F, age at study 18-95, race from several admissions per subject, mostly one
    value, sometimes another spelling of the same group, UNKNOWN-like values or OTHER; 5 % of
    subjects have no admission, 1 % are missing from patients.csv, and 10 % extra MIMIC-IV
    subjects have no chest X-ray at all (as in the real MIMIC-IV).
  - Race and age group per image are derived with the cohort builder's own functions
    (`cxr_fast.data.cohort_rules.subject_race`, `mimic_age`, `age_group`), so the planted groups
    are exactly the groups the cohort reports.

Drawing (`draw_radiograph`)
  A frontal or lateral chest (body, lungs, mediastinum, heart, ribs, clavicles or spine,
  vessels) with per-image position, scale, rotation, exposure, gamma and noise, plus one
  visible correlate per finding: cardiomegaly = larger cardiac silhouette, effusion = basal
  opacity with a meniscus that blunts the costophrenic angle, edema = perihilar bat-wing
  haze, consolidation/pneumonia = patchy airspace opacity, fracture = a rib gap through a
  bright callus, and also atelectasis (plate-like band), lung opacity (fuzzy blobs), lung
  lesion (sharp nodule), pneumothorax (dark rim with a pleural line), enlarged
  cardiomediastinum (wide upper mediastinum), pleural other (wall thickening), support
  devices (tube, line, pacemaker). So an image without any positive or uncertain label shows
  none of them, and `No Finding` is learnable too.
  Uncertain (-1.0) labels are drawn faintly: the same correlate at half strength.
  Above 256 px the chest is drawn at half the output resolution and scaled up (the finest
  drawn structure is still several pixels wide; it halves the generation time).
  Each image has its own generator `np.random.default_rng([seed, image_index])`, split into
  independent streams for anatomy, each finding, exposure and the planted hardness, so
  adding or removing a finding never moves the rest of the picture.

The planted disparity (on by default; `--no-bias` turns it off)
  Images of subjects whose derived race is `Black`, and images whose age group at the study
  is `80+`, get hardness 1.0: every finding is drawn at FINDING_CONTRAST_WHEN_HARD (0.2) of
  its contrast and overlaid, inside the finding only, with blotchy noise (sd
  FINDING_NOISE_SD_WHEN_HARD, grain 1/16 of the image), so a classifier misses findings
  there. Everything else is identical with and without bias: same subjects, labels,
  demographics and CSV bytes; images without any drawn finding have identical pixels.

Deviations from the real MIMIC files (all deliberate)
  - Images are square `--image-size` JPEGs and `Rows`/`Columns` say so (real ones are
    ~3000 px). The official split is 80/10/10 per subject (the real one is ~98/1/1) so a
    small phantom still has validation and test images.
  - admissions.csv.gz has a subset of MIMIC-IV's columns (no provider ids or ED times).
"""

from cxr_fast.data.phantom.drawing import FINDING_CONTRAST_WHEN_HARD, FINDING_NOISE_SD_WHEN_HARD, draw_radiograph
from cxr_fast.data.phantom.population import (FINDINGS, HARDER_AGE_GROUP, HARDER_RACE, UNCERTAIN_STRENGTH,
                                               PhantomTables, image_hardness, sample_tables)
from cxr_fast.data.phantom.truth import phantom_truth
from cxr_fast.data.phantom.write import TRUTH_NAME, generate_phantom

__all__ = [
    "FINDINGS", "FINDING_CONTRAST_WHEN_HARD", "FINDING_NOISE_SD_WHEN_HARD", "HARDER_AGE_GROUP", "HARDER_RACE",
    "TRUTH_NAME", "UNCERTAIN_STRENGTH", "PhantomTables", "draw_radiograph", "generate_phantom", "image_hardness",
    "phantom_truth", "sample_tables",
]
