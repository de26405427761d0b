# The code of the tutorial's Chapter 4.4 ("visualising the distribution of gradients and weights"),
# as the chapter prints it, run by test_tutorial.py against this project's utils.py. Two changes only:
# the chapter defines `norMean` but uses `normMean` (a NameError as printed), and max_epoch comes from
# the environment so that the test stays short.
import torch
from torch.utils.data import DataLoader
import torchvision.transforms as transforms
import numpy as np
import os
from torch.autograd import Variable
import torch.nn as nn
import torch.optim as optim
import sys
import os
sys.path.append("..")
from utils import MyDataset, validate, show_confMat, Net
from tensorboardX import SummaryWriter
from datetime import datetime

train_txt_path = os.path.join("Data","train.txt")
valid_txt_path = os.path.join("Data", "valid.txt")
classes_name = ['plane','car','bird','cat','deer','dog','frog','horse','ship','truck']
train_bs = 16
valid_bs = 16
lr_init = 0.001
max_epoch = int(os.environ.get("TUTORIAL_EPOCHS", 3))
# log
log_dir = os.path.join("Result","hist_grad_weight")
writer = SummaryWriter(log_dir = log_dir)

# Step 1/4: data
normMean = [0.4948052, 0.48568845, 0.44682974]
normStd = [0.24580306, 0.24236229, 0.2603115]
normTransform = transforms.Normalize(normMean, normStd)
trainTransform = transforms.Compose([
    transforms.Resize(32),
    transforms.RandomCrop(32, padding=4),
    transforms.ToTensor(),
    normTransform
])
validTransform = transforms.Compose([
    transforms.ToTensor(),
    normTransform
])

train_data = MyDataset(txt_path=train_txt_path, transform=trainTransform)
valid_data = MyDataset(txt_path=valid_txt_path, transform=validTransform)

train_loader = DataLoader(dataset=train_data, batch_size=train_bs, shuffle=True)
valid_loader = DataLoader(dataset=valid_data, batch_size=valid_bs)

# Step 2/4: the network
net = Net()
net.initialize_weights()

# Step 3/4: loss and optimiser
criterion = nn.CrossEntropyLoss()
optimizer = optim.SGD(net.parameters(), lr=lr_init, momentum=0.9, dampening=0.1)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.1)

# Step 4/4: training
for epoch in range(max_epoch):
    loss_sigma = 0.0
    correct = 0.0
    total = 0.0


    for i, data in enumerate(train_loader):
        inputs, labels = data
        inputs, labels = Variable(inputs), Variable(labels)
        # forward, backward, update weights
        optimizer.zero_grad()
        outputs = net(inputs)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()


        _, predicted = torch.max(outputs.data, 1)
        total += labels.size(0)
        correct =+(predicted == labels).squeeze().sum().numpy()
        loss_sigma +=loss.item()

        if i% 10 == 9:
            loss_avg = loss_sigma/10
            loss_sigma = 0.0
            print("Training:Epoch[{:0>3}/{:0>3}] Iteration[{:0>3}/{:0>3}] Loss:{:.4f} Acc:{:.2%}".format(
            epoch+1, max_epoch, i+1, len(train_loader), loss_avg, correct/total))
    scheduler.step()
    for name, layer in net.named_parameters():
        writer.add_histogram(name+ '_grad', layer.grad.cpu().data.numpy(), epoch)
        writer.add_histogram(name+ '_data', layer.cpu().data.numpy(), epoch)
print('Finished Training')

# The helpers the chapter's companions use after training.
conf_mat, valid_acc = validate(net, valid_loader, 'valid', classes_name)
show_confMat(conf_mat, classes_name, 'valid', log_dir)
print('valid accuracy', valid_acc)
