from .sliding import FittedSlidingWindowInferer, fitted_roi_size
from .support import FixedPrototypeSegmenter, SupportConditionedInferer
